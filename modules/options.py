"""AUTOMATIC1111's settings: every key its 1.10.x release serves from GET /sdapi/v1/options, persisted.

The table below is data: for each key AUTOMATIC1111's default, label, settings section, kind
(bool / int / float / number / str / str? / list, or html for the explanatory blocks that are
never stored) and fixed choices, read from its `modules/shared_options.py` and from the options
its built-in extensions add (Lora, LDSR, SwinIR, ScuNET, canvas-zoom-and-pan, extra-options-section,
hypertile). `takes_effect` marks the keys this engine honours; the others are stored, saved and
returned unchanged, as AUTOMATIC1111 does, so a client that reads and writes its settings works.
Left out: the `prioritized_callbacks_*` keys AUTOMATIC1111 adds for whatever callbacks its
installed scripts register (they depend on the installation, not on the release).

`Options` holds one server's values (no module-level state). How it follows AUTOMATIC1111:
- GET is `get_all()`: every stored key, the table's keys first (in table order), then the keys it
  does not know (kept from config.json or a POST), so GET -> POST -> GET gives equal JSON.
- POST is `set(values, is_api=True)`. A value equal to the stored one (same type) changes nothing,
  as in A1111's `Options.set`. The html keys and the keys A1111 marks `restrict_api` (the API's
  own URL settings) are ignored through the API, as there. `sd_checkpoint_hash` is the loaded
  checkpoint's hash: the engine records it, a POST of it is ignored (A1111 would store what it is
  sent until the next load; here GET never reports a hash the loaded model does not have).
- Where this project differs: A1111 checks no types (it only warns when loading a bad config) and
  answers an unknown key it has not stored with a KeyError (HTTP 500), after having applied the keys
  before it. Here every known key's value is checked (kind, fixed choices; and for the keys that
  take effect the range the engine can honour) and a bad one raises InvalidParameter naming the key
  and what it expects, with nothing changed (all or nothing); a key the table does not know (an
  extension's, say) is stored and returned, as A1111 does with those it finds in config.json.
  `samples_format` / `grid_format` take A1111's listed formats (png, jpg, jpeg, webp, avif); its
  dropdown also lets one type any other PIL format, "compatibility not guaranteed": refused here.
- `save(path)` writes config.json atomically (a temp file in the same folder, fsync, os.replace),
  in A1111's format (indent 4, UTF-8). `load(path)` is tolerant: a missing file gives the
  defaults; a damaged one is reported (`load_error`), moved aside to `<name>.corrupt` and the
  defaults used; a known key with a value of the wrong kind is reported (`load_warnings`) and its
  default used; unknown keys are kept. A1111's migrations of old keys are applied.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from modules.errors import InvalidParameter

log = logging.getLogger(__name__)

KINDS = ("bool", "int", "float", "number", "str", "str?", "list", "html")
AUTOMATIC_VAE = ("Automatic", "auto")  # "auto": A1111's old configs


@dataclass(frozen=True)
class OptionInfo:
    """One setting. `kind` "number" takes an int or a float and keeps which (A1111's gr.Number fields);
    "int" takes whole numbers (a float such as 4.0, as A1111's UI sends them, becomes 4); "str?" is
    text or null. `minimum`/`maximum` are A1111's slider range, enforced only where `takes_effect`.
    `choices_from` names where a dropdown's choices come from at run time ("checkpoints", "vaes")."""

    default: Any
    label: str
    kind: str = ""
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    takes_effect: bool = False
    restrict_api: bool = False
    read_only: bool = False
    infotext: str | None = None
    choices_from: str | None = None
    section: tuple[str | None, str] = (None, "")  # A1111's (id, label)

    def __post_init__(self):
        if not self.kind:
            d = self.default
            kind = ("bool" if isinstance(d, bool) else "int" if isinstance(d, int) else "float"
                    if isinstance(d, float) else "str" if isinstance(d, str) else "list" if isinstance(d, list)
                    else "str?")
            object.__setattr__(self, "kind", kind)
        if self.kind not in KINDS:
            raise ValueError(f"unknown option kind {self.kind!r}")


def O(default: Any, label: str, kind: str = "", choices=None, lo=None, hi=None, effect=False, **kw) -> OptionInfo:
    """The table's shorthand for one option."""
    return OptionInfo(default, label, kind, tuple(choices) if choices is not None else None, lo, hi, effect, **kw)


def H(label: str) -> OptionInfo:
    """An explanatory block of the settings page (A1111's OptionHTML): never stored nor served."""
    return OptionInfo("", label, "html")


# A1111's categories, in the order it registers them: the settings page groups sections by them.
CATEGORIES = {"saving": "Saving images", "sd": "Stable Diffusion", "ui": "User Interface", "system": "System",
              "postprocessing": "Postprocessing", "training": "Training"}
# (section id, label) -> category id (None: A1111 gives it none; it comes last, as "Uncategorized")
SECTION_CATEGORIES: dict[tuple[str | None, str], str | None] = {}
OPTIONS: dict[str, OptionInfo] = {}


def _section(section_id: str | None, label: str, category: str | None, options: dict[str, OptionInfo]) -> None:
    key = (section_id, label)
    SECTION_CATEGORIES.setdefault(key, category)
    for name, info in options.items():
        OPTIONS[name] = replace(info, section=key)


IMAGE_FORMATS = ("png", "jpg", "jpeg", "webp", "avif")
EMPHASIS = ("None", "Ignore", "Original", "No norm")
KEYS = ("Shift", "Ctrl", "Alt")
_WS = ("Tab", "Carriage Return", "Line Feed")

_section("saving-images", "Saving images/grids", "saving", {
    "samples_save": O(True, "Always save all generated images", effect=True),
    "samples_format": O("png", "File format for images", choices=IMAGE_FORMATS, effect=True),
    "samples_filename_pattern": O("", "Images filename pattern"),
    "save_images_add_number": O(True, "Add number to filename when saving", effect=True),
    "save_images_replace_action": O("Replace", "Saving the image to an existing file", choices=("Replace", "Add number suffix"), effect=True),
    "grid_save": O(True, "Always save all generated image grids"),
    "grid_format": O("png", "File format for grids", choices=IMAGE_FORMATS, effect=True),
    "grid_extended_filename": O(False, "Add extended info (seed, prompt) to filename when saving grid"),
    "grid_only_if_multiple": O(True, "Do not save grids consisting of one picture"),
    "grid_prevent_empty_spots": O(False, "Prevent empty spots in grid (when set to autodetect)"),
    "grid_zip_filename_pattern": O("", "Archive filename pattern"),
    "n_rows": O(-1, "Grid row count; use -1 for autodetect and 0 for it to be same as batch size", lo=-1, hi=16),
    "font": O("", "Font for image grids that have text"),
    "grid_text_active_color": O("#000000", "Text color for image grids"),
    "grid_text_inactive_color": O("#999999", "Inactive text color for image grids"),
    "grid_background_color": O("#ffffff", "Background color for image grids"),
    "save_images_before_face_restoration": O(False, "Save a copy of image before doing face restoration."),
    "save_images_before_highres_fix": O(False, "Save a copy of image before applying highres fix."),
    "save_images_before_color_correction": O(False, "Save a copy of image before applying color correction to img2img results"),
    "save_mask": O(False, "For inpainting, save a copy of the greyscale mask"),
    "save_mask_composite": O(False, "For inpainting, save a masked composite"),
    "jpeg_quality": O(80, "Quality for saved jpeg and avif images", lo=1, hi=100, effect=True),
    "webp_lossless": O(False, "Use lossless compression for webp images", effect=True),
    "export_for_4chan": O(True, "Save copy of large images as JPG"),
    "img_downscale_threshold": O(4.0, "File size limit for the above option, MB", "number"),
    "target_side_length": O(4000, "Width/height limit for the above option, in pixels", "number"),
    "img_max_size_mp": O(200, "Maximum image size", "number"),
    "use_original_name_batch": O(True, "Use original name for output filename during batch process in extras tab"),
    "use_upscaler_name_as_suffix": O(False, "Use upscaler name as filename suffix in the extras tab"),
    "save_selected_only": O(True, "When using 'Save' button, only save a single selected image"),
    "save_write_log_csv": O(True, "Write log.csv when saving images using 'Save' button"),
    "save_init_img": O(False, "Save init images when using img2img"),
    "temp_dir": O("", "Directory for temporary images; leave empty for default"),
    "clean_temp_dir_at_start": O(False, "Cleanup non-default temporary directory when starting webui"),
    "save_incomplete_images": O(False, "Save incomplete images"),
    "notification_audio": O(True, "Play notification sound after image generation"),
    "notification_volume": O(100, "Notification sound volume", lo=0, hi=100),
})
_section("saving-paths", "Paths for saving", "saving", {
    "outdir_samples": O("", "Output directory for images; if empty, defaults to three directories below", effect=True),
    "outdir_txt2img_samples": O("outputs/txt2img-images", "Output directory for txt2img images", effect=True),
    "outdir_img2img_samples": O("outputs/img2img-images", "Output directory for img2img images", effect=True),
    "outdir_extras_samples": O("outputs/extras-images", "Output directory for images from extras tab"),
    "outdir_grids": O("", "Output directory for grids; if empty, defaults to two directories below", effect=True),
    "outdir_txt2img_grids": O("outputs/txt2img-grids", "Output directory for txt2img grids", effect=True),
    "outdir_img2img_grids": O("outputs/img2img-grids", "Output directory for img2img grids", effect=True),
    "outdir_save": O("log/images", "Directory for saving images using the Save button"),
    "outdir_init_images": O("outputs/init-images", "Directory for saving init images when using img2img"),
})
_section("saving-to-dirs", "Saving to a directory", "saving", {
    "save_to_dirs": O(True, "Save images to a subdirectory", effect=True),
    "grid_save_to_dirs": O(True, "Save grids to a subdirectory"),
    "use_save_to_dirs_for_ui": O(False, "When using \"Save\" button, save images to a subdirectory"),
    "directories_filename_pattern": O("[date]", "Directory name pattern"),
    "directories_max_prompt_words": O(8, "Max prompt words for [prompt_words] pattern", lo=1, hi=20),
})
_section("upscaling", "Upscaling", "postprocessing", {
    "ESRGAN_tile": O(192, "Tile size for ESRGAN upscalers.", lo=0, hi=512),
    "ESRGAN_tile_overlap": O(8, "Tile overlap for ESRGAN upscalers.", lo=0, hi=48),
    "realesrgan_enabled_models": O(["R-ESRGAN 4x+", "R-ESRGAN 4x+ Anime6B"], "Select which Real-ESRGAN models to show in the web UI."),
    "dat_enabled_models": O(["DAT x2", "DAT x3", "DAT x4"], "Select which DAT models to show in the web UI."),
    "DAT_tile": O(192, "Tile size for DAT upscalers.", lo=0, hi=512),
    "DAT_tile_overlap": O(8, "Tile overlap for DAT upscalers.", lo=0, hi=48),
    "upscaler_for_img2img": O(None, "Upscaler for img2img", "str?"),
    "set_scale_by_when_changing_upscaler": O(False, "Automatically set the Scale by factor based on the name of the selected Upscaler."),
    # extensions-builtin LDSR, SwinIR, ScuNET (added in their on_ui_settings)
    "ldsr_steps": O(100, "LDSR processing steps. Lower = faster", lo=1, hi=200),
    "ldsr_cached": O(False, "Cache LDSR model in memory"),
    "SWIN_tile": O(192, "Tile size for all SwinIR.", lo=16, hi=512),
    "SWIN_tile_overlap": O(8, "Tile overlap, in pixels for SwinIR. Low values = visible seam.", lo=0, hi=48),
    "SWIN_torch_compile": O(False, "Use torch.compile to accelerate SwinIR."),
    "SCUNET_tile": O(256, "Tile size for SCUNET upscalers.", lo=0, hi=512),
    "SCUNET_tile_overlap": O(8, "Tile overlap for SCUNET upscalers.", lo=0, hi=64),
})
_section("face-restoration", "Face restoration", "postprocessing", {
    "face_restoration": O(False, "Restore faces", infotext="Face restoration"),
    "face_restoration_model": O("CodeFormer", "Face restoration model"),
    "code_former_weight": O(0.5, "CodeFormer weight", lo=0, hi=1),
    "face_restoration_unload": O(False, "Move face restoration model from VRAM into RAM after processing"),
})
_section("system", "System", "system", {
    "auto_launch_browser": O("Local", "Automatically open webui in browser on startup", choices=("Disable", "Local", "Remote")),
    "enable_console_prompts": O(False, "Print prompts to console when generating with txt2img and img2img."),
    "show_warnings": O(False, "Show warnings in console."),
    "show_gradio_deprecation_warnings": O(True, "Show gradio deprecation warnings in console."),
    "memmon_poll_rate": O(8, "VRAM usage polls per second during generation.", lo=0, hi=40),
    "samples_log_stdout": O(False, "Always print all generation info to standard output"),
    "multiple_tqdm": O(True, "Add a second progress bar to the console that shows progress for an entire job."),
    "enable_upscale_progressbar": O(True, "Show a progress bar in the console for tiled upscaling."),
    "print_hypernet_extra": O(False, "Print extra hypernetwork information to console."),
    "list_hidden_files": O(True, "Load models/files in hidden directories"),
    "disable_mmap_load_safetensors": O(False, "Disable memmapping for loading .safetensors files."),
    "hide_ldm_prints": O(True, "Prevent Stability-AI's ldm/sgm modules from printing noise to console."),
    "dump_stacks_on_signal": O(False, "Print stack traces before exiting the program with ctrl+c."),
})
_section("profiler", "Profiler", "system", {
    "profiling_explanation": H("Those settings allow you to enable torch profiler when generating pictures."),
    "profiling_enable": O(False, "Enable profiling"),
    "profiling_activities": O(["CPU"], "Activities", choices=("CPU", "CUDA")),
    "profiling_record_shapes": O(True, "Record shapes"),
    "profiling_profile_memory": O(True, "Profile memory"),
    "profiling_with_stack": O(True, "Include python stack"),
    "profiling_filename": O("trace.json", "Profile filename"),
})
_section("API", "API", "system", {
    "api_enable_requests": O(True, "Allow http:// and https:// URLs for input images in API", restrict_api=True),
    "api_forbid_local_requests": O(True, "Forbid URLs to local resources", restrict_api=True),
    "api_useragent": O("", "User agent for requests", restrict_api=True),
})
_section("training", "Training", "training", {
    "unload_models_when_training": O(False, "Move VAE and CLIP to RAM when training if possible. Saves VRAM."),
    "pin_memory": O(False, "Turn on pin_memory for DataLoader. Makes training slightly faster but can increase memory usage."),
    "save_optimizer_state": O(False, "Saves Optimizer state as separate *.optim file. Training of embedding or HN can be resumed with the matching optim file."),
    "save_training_settings_to_txt": O(True, "Save textual inversion and hypernet settings to a text file whenever training starts."),
    "dataset_filename_word_regex": O("", "Filename word regex"),
    "dataset_filename_join_string": O(" ", "Filename join string"),
    "training_image_repeats_per_epoch": O(1, "Number of repeats for a single input image per epoch; used only for displaying epoch number"),
    "training_write_csv_every": O(500, "Save an csv containing the loss to log directory every N steps, 0 to disable"),
    "training_xattention_optimizations": O(False, "Use cross attention optimizations while training"),
    "training_enable_tensorboard": O(False, "Enable tensorboard logging."),
    "training_tensorboard_save_images": O(False, "Save generated images within tensorboard."),
    "training_tensorboard_flush_every": O(120, "How often, in seconds, to flush the pending tensorboard events and summaries to disk."),
})
_section("sd", "Stable Diffusion", "sd", {
    "sd_model_checkpoint": O(None, "Stable Diffusion checkpoint", "str?", effect=True, infotext="Model hash", choices_from="checkpoints"),
    "sd_checkpoints_limit": O(1, "Maximum number of checkpoints loaded at the same time", lo=1, hi=10, effect=True),
    "sd_checkpoints_keep_in_cpu": O(True, "Only keep one model on device"),
    "sd_checkpoint_cache": O(0, "Checkpoints to cache in RAM", lo=0, hi=10, effect=True),
    "sd_unet": O("Automatic", "SD Unet"),
    "enable_quantization": O(False, "Enable quantization in K samplers for sharper and cleaner results. This may change existing seeds"),
    "emphasis": O("Original", "Emphasis mode", choices=EMPHASIS, infotext="Emphasis"),
    "enable_batch_seeds": O(True, "Make K-diffusion samplers produce same images in a batch as when making a single image"),
    "comma_padding_backtrack": O(20, "Prompt word wrap length limit", lo=0, hi=74),
    "CLIP_stop_at_last_layers": O(1, "Clip skip", lo=1, hi=12, effect=True, infotext="Clip skip"),
    "upcast_attn": O(False, "Upcast cross attention layer to float32"),
    "randn_source": O("CPU", "Random number generator source (this project: CPU, so a seed gives the same image on any device; AUTOMATIC1111: GPU).", choices=("GPU", "CPU", "NV"), effect=True, infotext="RNG"),
    "tiling": O(False, "Tiling", infotext="Tiling"),
    "hires_fix_refiner_pass": O("second pass", "Hires fix: which pass to enable refiner for", choices=("first pass", "second pass", "both passes"), infotext="Hires refiner"),
})
_section("sdxl", "Stable Diffusion XL", "sd", {
    "sdxl_crop_top": O(0, "crop top coordinate", lo=0, effect=True),
    "sdxl_crop_left": O(0, "crop left coordinate", lo=0, effect=True),
    "sdxl_refiner_low_aesthetic_score": O(2.5, "SDXL low aesthetic score", "number"),
    "sdxl_refiner_high_aesthetic_score": O(6.0, "SDXL high aesthetic score", "number"),
    "sdxl_clip_l_skip": O(False, "Clip skip SDXL"),
})
_section("sd3", "Stable Diffusion 3", "sd", {
    "sd3_enable_t5": O(False, "Enable T5"),
})
_section("vae", "VAE", "sd", {
    "sd_vae_explanation": H("VAE is a neural network that transforms a standard RGB image into latent space representation and back."),
    "sd_vae_checkpoint_cache": O(0, "VAE Checkpoints to cache in RAM", lo=0, hi=10),
    "sd_vae": O("Automatic", "SD VAE", effect=True, infotext="VAE", choices_from="vaes"),
    "sd_vae_overrides_per_model_preferences": O(True, "Selected VAE overrides per-model preferences", effect=True),
    "auto_vae_precision_bfloat16": O(False, "Automatically convert VAE to bfloat16"),
    "auto_vae_precision": O(True, "Automatically revert VAE to 32-bit floats"),
    "sd_vae_encode_method": O("Full", "VAE type for encode", choices=("Full", "TAESD"), infotext="VAE Encoder"),
    "sd_vae_decode_method": O("Full", "VAE type for decode", choices=("Full", "TAESD"), infotext="VAE Decoder"),
})
_section("img2img", "img2img", "sd", {
    "inpainting_mask_weight": O(1.0, "Inpainting conditioning mask strength", lo=0, hi=1, infotext="Conditional mask weight"),
    "initial_noise_multiplier": O(1.0, "Noise multiplier for img2img", lo=0, hi=1.5, infotext="Noise multiplier"),
    "img2img_extra_noise": O(0.0, "Extra noise multiplier for img2img and hires fix", lo=0, hi=1, infotext="Extra noise"),
    "img2img_color_correction": O(False, "Apply color correction to img2img results to match original colors."),
    "img2img_fix_steps": O(False, "With img2img, do exactly the amount of steps the slider specifies.", effect=True),
    "img2img_background_color": O("#ffffff", "With img2img, fill transparent parts of the input image with this color."),
    "img2img_editor_height": O(720, "Height of the image editor", lo=80, hi=1600),
    "img2img_sketch_default_brush_color": O("#ffffff", "Sketch initial brush color"),
    "img2img_inpaint_mask_brush_color": O("#ffffff", "Inpaint mask brush color"),
    "img2img_inpaint_sketch_default_brush_color": O("#ffffff", "Inpaint sketch initial brush color"),
    "return_mask": O(False, "For inpainting, include the greyscale mask in results for web"),
    "return_mask_composite": O(False, "For inpainting, include masked composite in results for web"),
    "img2img_batch_show_results_limit": O(32, "Show the first N batch img2img results in UI", lo=-1, hi=1000),
    "overlay_inpaint": O(True, "Overlay original for inpaint"),
})
_section("optimizations", "Optimizations", "sd", {
    "cross_attention_optimization": O("Automatic", "Cross attention optimization"),
    "s_min_uncond": O(0.0, "Negative Guidance minimum sigma", lo=0, hi=15, effect=True, infotext="NGMS"),
    "s_min_uncond_all": O(False, "Negative Guidance minimum sigma all steps", infotext="NGMS all steps"),
    "token_merging_ratio": O(0.0, "Token merging ratio", lo=0, hi=0.9, infotext="Token merging ratio"),
    "token_merging_ratio_img2img": O(0.0, "Token merging ratio for img2img", lo=0, hi=0.9),
    "token_merging_ratio_hr": O(0.0, "Token merging ratio for high-res pass", lo=0, hi=0.9, infotext="Token merging ratio hr"),
    "pad_cond_uncond": O(False, "Pad prompt/negative prompt", infotext="Pad conds"),
    "pad_cond_uncond_v0": O(False, "Pad prompt/negative prompt (v0)", infotext="Pad conds v0"),
    "persistent_cond_cache": O(True, "Persistent cond cache"),
    "batch_cond_uncond": O(True, "Batch cond/uncond"),
    "fp8_storage": O("Disable", "FP8 weight", choices=("Disable", "Enable for SDXL", "Enable")),
    "cache_fp16_weight": O(False, "Cache FP16 weight for LoRA"),
})
_section("compatibility", "Compatibility", "sd", {
    "auto_backcompat": O(True, "Automatic backward compatibility"),
    "use_old_emphasis_implementation": O(False, "Use old emphasis implementation. Can be useful to reproduce old seeds."),
    "use_old_karras_scheduler_sigmas": O(False, "Use old karras scheduler sigmas (0.1 to 10)."),
    "no_dpmpp_sde_batch_determinism": O(False, "Do not make DPM++ SDE deterministic across different batch sizes."),
    "use_old_hires_fix_width_height": O(False, "For hires fix, use width/height sliders to set final resolution rather than first pass (disables Upscale by, Resize width/height to)."),
    "hires_fix_use_firstpass_conds": O(False, "For hires fix, calculate conds of second pass using extra networks of first pass."),
    "use_old_scheduling": O(False, "Use old prompt editing timelines.", infotext="Old prompt editing timelines"),
    "use_downcasted_alpha_bar": O(False, "Downcast model alphas_cumprod to fp16 before sampling. For reproducing old seeds.", infotext="Downcast alphas_cumprod"),
    "refiner_switch_by_sample_steps": O(False, "Switch to refiner by sampling steps instead of model timesteps. Old behavior for refiner.", infotext="Refiner switch by sampling steps"),
    "lora_functional": O(False, "Lora/Networks: use old method that takes longer when you have multiple Loras active and produces same results as kohya-ss/sd-webui-additional-networks extension"),
})
_section("interrogate", "Interrogate", None, {
    "interrogate_keep_models_in_memory": O(False, "Keep models in VRAM"),
    "interrogate_return_ranks": O(False, "Include ranks of model tags matches in results."),
    "interrogate_clip_num_beams": O(1, "BLIP: num_beams", lo=1, hi=16),
    "interrogate_clip_min_length": O(24, "BLIP: minimum description length", lo=1, hi=128),
    "interrogate_clip_max_length": O(48, "BLIP: maximum description length", lo=1, hi=256),
    "interrogate_clip_dict_limit": O(1500, "CLIP: maximum number of lines in text file"),
    "interrogate_clip_skip_categories": O([], "CLIP: skip inquire categories"),
    "interrogate_deepbooru_score_threshold": O(0.5, "deepbooru: score threshold", lo=0, hi=1),
    "deepbooru_sort_alpha": O(True, "deepbooru: sort tags alphabetically"),
    "deepbooru_use_spaces": O(True, "deepbooru: use spaces in tags"),
    "deepbooru_escape": O(True, "deepbooru: escape (\\) brackets"),
    "deepbooru_filter_tags": O("", "deepbooru: filter out those tags"),
})
_section("extra_networks", "Extra Networks", "sd", {
    "extra_networks_show_hidden_directories": O(True, "Show hidden directories"),
    "extra_networks_dir_button_function": O(False, "Add a '/' to the beginning of directory buttons"),
    "extra_networks_hidden_models": O("When searched", "Show cards for models in hidden directories", choices=("Always", "When searched", "Never")),
    "extra_networks_default_multiplier": O(1.0, "Default multiplier for extra networks", lo=0, hi=2),
    "extra_networks_card_width": O(0, "Card width for Extra Networks"),
    "extra_networks_card_height": O(0, "Card height for Extra Networks"),
    "extra_networks_card_text_scale": O(1.0, "Card text scale", lo=0, hi=2),
    "extra_networks_card_show_desc": O(True, "Show description on card"),
    "extra_networks_card_description_is_html": O(False, "Treat card description as HTML"),
    "extra_networks_card_order_field": O("Path", "Default order field for Extra Networks cards", choices=("Path", "Name", "Date Created", "Date Modified")),
    "extra_networks_card_order": O("Ascending", "Default order for Extra Networks cards", choices=("Ascending", "Descending")),
    "extra_networks_tree_view_style": O("Dirs", "Extra Networks directory view style", choices=("Tree", "Dirs")),
    "extra_networks_tree_view_default_enabled": O(True, "Show the Extra Networks directory view by default"),
    "extra_networks_tree_view_default_width": O(180, "Default width for the Extra Networks directory tree view", "number"),
    "extra_networks_add_text_separator": O(" ", "Extra networks separator"),
    "ui_extra_networks_tab_reorder": O("", "Extra networks tab order"),
    "textual_inversion_print_at_load": O(False, "Print a list of Textual Inversion embeddings when loading model"),
    "textual_inversion_add_hashes_to_infotext": O(True, "Add Textual Inversion hashes to infotext"),
    "sd_hypernetwork": O("None", "Add hypernetwork to prompt"),
    "textual_inversion_image_embedding_data_cache": O(False, "Cache the data of image embeddings"),
    # extensions-builtin/Lora
    "sd_lora": O("None", "Add network to prompt"),
    "lora_preferred_name": O("Alias from file", "When adding to prompt, refer to Lora by", choices=("Alias from file", "Filename")),
    "lora_add_hashes_to_infotext": O(True, "Add Lora hashes to infotext"),
    "lora_bundled_ti_to_infotext": O(True, "Add Lora name as TI hashes for bundled Textual Inversion"),
    "lora_show_all": O(False, "Always show all networks on the Lora page"),
    "lora_hide_unknown_for_versions": O([], "Hide networks of unknown versions for model versions", choices=("SD1", "SD2", "SDXL")),
    "lora_in_memory_limit": O(0, "Number of Lora networks to keep cached in memory"),
    "lora_not_found_warning_console": O(False, "Lora not found warning in console"),
    "lora_not_found_gradio_warning": O(False, "Lora not found warning popup in webui"),
})
_section("ui_prompt_editing", "Prompt editing", "ui", {
    "keyedit_precision_attention": O(0.1, "Precision for (attention:1.1) when editing the prompt with Ctrl+up/down", lo=0.01, hi=0.2),
    "keyedit_precision_extra": O(0.05, "Precision for <extra networks:0.9> when editing the prompt with Ctrl+up/down", lo=0.01, hi=0.2),
    "keyedit_delimiters": O(r".,\/!?%^*;:{}=`~() ", "Word delimiters when editing the prompt with Ctrl+up/down"),
    "keyedit_delimiters_whitespace": O(list(_WS), "Ctrl+up/down whitespace delimiters", choices=_WS),
    "keyedit_move": O(True, "Alt+left/right moves prompt elements"),
    "disable_token_counters": O(False, "Disable prompt token counters"),
    "include_styles_into_token_counters": O(True, "Count tokens of enabled styles"),
})
_section("ui_gallery", "Gallery", "ui", {
    "return_grid": O(True, "Show grid in gallery"),
    "do_not_show_images": O(False, "Do not show any images in gallery"),
    "js_modal_lightbox": O(True, "Full page image viewer: enable"),
    "js_modal_lightbox_initially_zoomed": O(True, "Full page image viewer: show images zoomed in by default"),
    "js_modal_lightbox_gamepad": O(False, "Full page image viewer: navigate with gamepad"),
    "js_modal_lightbox_gamepad_repeat": O(250, "Full page image viewer: gamepad repeat period"),
    "sd_webui_modal_lightbox_icon_opacity": O(1, "Full page image viewer: control icon unfocused opacity", "number", lo=0, hi=1),
    "sd_webui_modal_lightbox_toolbar_opacity": O(0.9, "Full page image viewer: tool bar opacity", "number", lo=0, hi=1),
    "gallery_height": O("", "Gallery height"),
    "open_dir_button_choice": O("Subdirectory", "What directory the [📂] button opens", choices=("Output Root", "Subdirectory", "Subdirectory (even temp dir)")),
})
_section("ui_alternatives", "UI alternatives", "ui", {
    "compact_prompt_box": O(False, "Compact prompt layout"),
    "samplers_in_dropdown": O(True, "Use dropdown for sampler selection instead of radio group"),
    "dimensions_and_batch_together": O(True, "Show Width/Height and Batch sliders in same row"),
    "sd_checkpoint_dropdown_use_short": O(False, "Checkpoint dropdown: use filenames without paths"),
    "hires_fix_show_sampler": O(False, "Hires fix: show hires checkpoint and sampler selection"),
    "hires_fix_show_prompts": O(False, "Hires fix: show hires prompt and negative prompt"),
    "txt2img_settings_accordion": O(False, "Settings in txt2img hidden under Accordion"),
    "img2img_settings_accordion": O(False, "Settings in img2img hidden under Accordion"),
    "interrupt_after_current": O(True, "Don't Interrupt in the middle"),
})
_section("ui", "User interface", "ui", {
    "localization": O("None", "Localization"),
    "quicksettings_list": O(["sd_model_checkpoint"], "Quicksettings list"),
    "ui_tab_order": O([], "UI tab order"),
    "hidden_tabs": O([], "Hidden UI tabs"),
    "ui_reorder_list": O([], "UI item order for txt2img/img2img tabs"),
    "gradio_theme": O("Default", "Gradio theme"),
    "gradio_themes_cache": O(True, "Cache gradio themes locally"),
    "show_progress_in_title": O(True, "Show generation progress in window title."),
    "send_seed": O(True, "Send seed when sending prompt or image to other interface"),
    "send_size": O(True, "Send size when sending prompt or image to another interface"),
    "enable_reloading_ui_scripts": O(False, "Reload UI scripts when using Reload UI option"),
})
_section("infotext", "Infotext", "ui", {
    "infotext_explanation": H("Infotext is what this software calls the text that contains generation parameters."),
    "enable_pnginfo": O(True, "Write infotext to metadata of the generated image", effect=True),
    "save_txt": O(False, "Create a text file with infotext next to every generated image", effect=True),
    "add_model_name_to_info": O(True, "Add model name to infotext", effect=True),
    "add_model_hash_to_info": O(True, "Add model hash to infotext", effect=True),
    "add_vae_name_to_info": O(True, "Add VAE name to infotext", effect=True),
    "add_vae_hash_to_info": O(True, "Add VAE hash to infotext", effect=True),
    "add_user_name_to_info": O(False, "Add user name to infotext when authenticated"),
    "add_version_to_infotext": O(True, "Add program version to infotext", effect=True),
    "disable_weights_auto_swap": O(True, "Disregard checkpoint information from pasted infotext"),
    "infotext_skip_pasting": O([], "Disregard fields from pasted infotext"),
    "infotext_styles": O("Apply if any", "Infer styles from prompts of pasted infotext", choices=("Ignore", "Apply", "Discard", "Apply if any")),
})
_section("ui", "Live previews", "ui", {
    "show_progressbar": O(True, "Show progressbar"),
    "live_previews_enable": O(True, "Show live previews of the created image", effect=True),
    "live_previews_image_format": O("png", "Live preview file format", choices=("jpeg", "png", "webp")),
    "show_progress_grid": O(True, "Show previews of all images generated in a batch as a grid"),
    "show_progress_every_n_steps": O(10, "Live preview display period", lo=-1, hi=32, effect=True),
    "show_progress_type": O("Approx NN", "Live preview method", choices=("Full", "Approx NN", "Approx cheap", "TAESD"), effect=True),
    "live_preview_allow_lowvram_full": O(False, "Allow Full live preview method with lowvram/medvram"),
    "live_preview_content": O("Prompt", "Live preview subject", choices=("Combined", "Prompt", "Negative prompt"), effect=True),
    "live_preview_refresh_period": O(1000, "Progressbar and preview update period"),
    "live_preview_fast_interrupt": O(False, "Return image with chosen live preview method on interrupt"),
    "js_live_preview_in_modal_lightbox": O(False, "Show Live preview in full page image viewer"),
    "prevent_screen_sleep_during_generation": O(True, "Prevent screen sleep during generation"),
})
_section("sampler-params", "Sampler parameters", "sd", {
    "hide_samplers": O([], "Hide samplers in user interface"),
    "eta_ddim": O(0.0, "Eta for DDIM", lo=0, hi=1, effect=True, infotext="Eta DDIM"),
    "eta_ancestral": O(1.0, "Eta for k-diffusion samplers", lo=0, hi=1, effect=True, infotext="Eta"),
    "ddim_discretize": O("uniform", "img2img DDIM discretize", choices=("uniform", "quad")),
    "s_churn": O(0.0, "sigma churn", lo=0, hi=100, infotext="Sigma churn"),
    "s_tmin": O(0.0, "sigma tmin", lo=0, hi=10, infotext="Sigma tmin"),
    "s_tmax": O(0.0, "sigma tmax", lo=0, hi=999, infotext="Sigma tmax"),
    "s_noise": O(1.0, "sigma noise", lo=0, hi=1.1, infotext="Sigma noise"),
    "sigma_min": O(0.0, "sigma min", "number", infotext="Schedule min sigma"),
    "sigma_max": O(0.0, "sigma max", "number", infotext="Schedule max sigma"),
    "rho": O(0.0, "rho", "number", infotext="Schedule rho"),
    "eta_noise_seed_delta": O(0, "Eta noise seed delta", effect=True, infotext="ENSD"),
    "always_discard_next_to_last_sigma": O(False, "Always discard next-to-last sigma", effect=True, infotext="Discard penultimate sigma"),
    "sgm_noise_multiplier": O(False, "SGM noise multiplier", infotext="SGM noise multiplier"),
    "uni_pc_variant": O("bh1", "UniPC variant", choices=("bh1", "bh2", "vary_coeff"), infotext="UniPC variant"),
    "uni_pc_skip_type": O("time_uniform", "UniPC skip type", choices=("time_uniform", "time_quadratic", "logSNR"), infotext="UniPC skip type"),
    "uni_pc_order": O(3, "UniPC order", lo=1, hi=50, infotext="UniPC order"),
    "uni_pc_lower_order_final": O(True, "UniPC lower order final", infotext="UniPC lower order final"),
    "sd_noise_schedule": O("Default", "Noise schedule for sampling", choices=("Default", "Zero Terminal SNR"), infotext="Noise Schedule"),
    "skip_early_cond": O(0.0, "Ignore negative prompt during early sampling", lo=0, hi=1, infotext="Skip Early CFG"),
    "beta_dist_alpha": O(0.6, "Beta scheduler - alpha", lo=0.01, hi=1, infotext="Beta scheduler alpha"),
    "beta_dist_beta": O(0.6, "Beta scheduler - beta", lo=0.01, hi=1, infotext="Beta scheduler beta"),
})
_section("postprocessing", "Postprocessing", "postprocessing", {
    "postprocessing_enable_in_main_ui": O([], "Enable postprocessing operations in txt2img and img2img tabs"),
    "postprocessing_disable_in_extras": O([], "Disable postprocessing operations in extras tab"),
    "postprocessing_operation_order": O([], "Postprocessing operation order"),
    "upscaling_max_images_in_cache": O(5, "Maximum number of images in upscaling cache", lo=0, hi=10),
    "postprocessing_existing_caption_action": O("Ignore", "Action for existing captions", choices=("Ignore", "Keep", "Prepend", "Append")),
})
_section(None, "Hidden options", None, {
    "disabled_extensions": O([], "Disable these extensions"),
    "disable_all_extensions": O("none", "Disable all extensions (preserves the list of disabled extensions)", choices=("none", "extra", "all")),
    "restore_config_state_file": O("", "Config state file to restore from, under 'config-states/' folder"),
    "sd_checkpoint_hash": O("", "SHA256 hash of the current checkpoint", read_only=True),
})
# extensions-builtin/canvas-zoom-and-pan, extra-options-section, hypertile
_section("canvas_hotkey", "Canvas Hotkeys", None, {
    "canvas_hotkey_zoom": O("Alt", "Zoom canvas", choices=KEYS),
    "canvas_hotkey_adjust": O("Ctrl", "Adjust brush size", choices=KEYS),
    "canvas_hotkey_shrink_brush": O("Q", "Shrink the brush size"),
    "canvas_hotkey_grow_brush": O("W", "Enlarge the brush size"),
    "canvas_hotkey_move": O("F", "Moving the canvas"),
    "canvas_hotkey_fullscreen": O("S", "Fullscreen Mode, maximizes the picture so that it fits into the screen and stretches it to its full width "),
    "canvas_hotkey_reset": O("R", "Reset zoom and canvas position"),
    "canvas_hotkey_overlap": O("O", "Toggle overlap"),
    "canvas_show_tooltip": O(True, "Enable tooltip on the canvas"),
    "canvas_auto_expand": O(True, "Automatically expands an image that does not fit completely in the canvas area, similar to manually pressing the S and R buttons"),
    "canvas_blur_prompt": O(False, "Take the focus off the prompt when working with a canvas"),
    "canvas_disabled_functions": O(["Overlap"], "Disable function that you don't use", choices=("Zoom", "Adjust brush size", "Hotkey enlarge brush", "Hotkey shrink brush", "Moving canvas", "Fullscreen", "Reset Zoom", "Overlap")),
})
_section("settings_in_ui", "Settings in UI", "ui", {
    "settings_in_ui": H("This page allows you to add some settings to the main interface of txt2img and img2img tabs."),
    "extra_options_txt2img": O([], "Settings for txt2img"),
    "extra_options_img2img": O([], "Settings for img2img"),
    "extra_options_cols": O(1, "Number of columns for added settings", lo=1, hi=20),
    "extra_options_accordion": O(False, "Place added settings into an accordion"),
})
_section("hypertile", "Hypertile", None, {
    "hypertile_explanation": H("Hypertile optimizes the self-attention layer within U-Net and VAE models."),
    "hypertile_enable_unet": O(False, "Enable Hypertile U-Net"),
    "hypertile_enable_unet_secondpass": O(False, "Enable Hypertile U-Net for hires fix second pass"),
    "hypertile_max_depth_unet": O(3, "Hypertile U-Net max depth", lo=0, hi=3),
    "hypertile_max_tile_unet": O(256, "Hypertile U-net max tile size", lo=0, hi=512),
    "hypertile_swap_size_unet": O(3, "Hypertile U-net swap size", lo=0, hi=64),
    "hypertile_enable_vae": O(False, "Enable Hypertile VAE"),
    "hypertile_max_depth_vae": O(3, "Hypertile VAE max depth", lo=0, hi=3),
    "hypertile_max_tile_vae": O(128, "Hypertile VAE max tile size", lo=0, hi=512),
    "hypertile_swap_size_vae": O(3, "Hypertile VAE swap size ", lo=0, hi=64),
})

READ_ONLY = frozenset(k for k, v in OPTIONS.items() if v.read_only)
TAKES_EFFECT = tuple(k for k, v in OPTIONS.items() if v.takes_effect)
MAX_UNKNOWN_KEYS = 10_000  # keys the table does not know that one server keeps (extensions' settings)


# -- checking values -------------------------------------------------------------------------
def _expected(info: OptionInfo) -> str:
    if info.choices is not None and info.kind == "list":
        return "a list of " + ", ".join(repr(c) for c in info.choices)
    if info.choices is not None:
        return "one of " + ", ".join(repr(c) for c in info.choices)
    return {"bool": "true or false", "int": "a whole number", "float": "a number", "number": "a number",
            "str": "text", "str?": "text or null", "list": "a list of text"}[info.kind]


def check_value(key: str, value: Any, info: OptionInfo | None = None, *, ranges: bool | None = None) -> Any:
    """`value` as option `key` stores it, or InvalidParameter naming the key and what it expects.

    Ranges are checked for the keys that take effect (unless `ranges` says otherwise): the engine
    must be able to honour them; the others are stored as sent, as AUTOMATIC1111 stores them.
    """
    info = info or OPTIONS[key]

    def bad(what: str | None = None):
        return InvalidParameter(f"option {key} must be {what or _expected(info)}, got {value!r}", field=key)

    kind = info.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
    elif kind in ("int", "float", "number"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        if kind == "int":
            if isinstance(value, float):
                if not value.is_integer():
                    raise bad()
                value = int(value)
        elif kind == "float" and isinstance(value, int) and not isinstance(info.default, int):
            value = float(value)
        if info.takes_effect if ranges is None else ranges:
            if (info.minimum is not None and value < info.minimum) or (info.maximum is not None and value > info.maximum):
                lo = "" if info.minimum is None else f"{info.minimum:g}"
                hi = "" if info.maximum is None else f"{info.maximum:g}"
                what = f"between {lo} and {hi}" if lo and hi else (f"at least {lo}" if lo else f"at most {hi}")
                raise bad(f"a {'whole ' if kind == 'int' else ''}number {what}")
    elif kind in ("str", "str?"):
        if not (isinstance(value, str) or (value is None and kind == "str?")):
            raise bad()
        if info.choices is not None and value not in info.choices:
            raise bad()
    elif kind == "list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad()
        if info.choices is not None and any(v not in info.choices for v in value):
            raise bad()
        value = list(value)
    return value


def _check_unknown(key: Any, value: Any) -> Any:
    if not isinstance(key, str) or not key or len(key) > 256:
        raise InvalidParameter(f"option names must be text of 1 to 256 characters, got {key!r}", field=str(key))
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidParameter(f"option {key} must be a JSON value, got {value!r}", field=key) from None
    return copy.deepcopy(value)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (so True does not pass for 1, nor 1 for 1.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


# -- the options of one server ---------------------------------------------------------------
class Options(Mapping):
    """One server's settings: AUTOMATIC1111's keys with their values, plus keys it does not know.

    A read-only Mapping of key -> value (so `options["CLIP_stop_at_last_layers"]`, `.get()` and
    `{**options}` work); change it with `set()` (checked, all or nothing) or, for the values the
    engine itself owns (the loaded checkpoint's title and hash), `record()`. Thread-safe.
    `defaults` replaces table defaults for this server (e.g. `outdir_txt2img_samples` from the
    `--outdir-samples` flag); they are checked like any value.
    """

    def __init__(self, defaults: Mapping[str, Any] | None = None):
        self._lock = threading.RLock()
        self._defaults = {k: copy.deepcopy(v.default) for k, v in OPTIONS.items() if v.kind != "html"}
        for key, value in (defaults or {}).items():
            if key not in self._defaults:
                raise KeyError(f"unknown option {key!r}")
            self._defaults[key] = check_value(key, value, ranges=True)
        self._data: dict[str, Any] = copy.deepcopy(self._defaults)
        self.load_error: str | None = None  # why the last load() used the defaults
        self.load_warnings: list[str] = []  # keys of the last load() whose value was refused

    # Mapping
    def __getitem__(self, key: str) -> Any:
        with self._lock:
            return copy.deepcopy(self._data[key])

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._data))

    def __len__(self) -> int:
        return len(self._data)

    def default(self, key: str) -> Any:
        return copy.deepcopy(self._defaults.get(key))

    def get_all(self) -> dict[str, Any]:
        """GET /sdapi/v1/options: every stored key (the table's, in its order, then unknown ones), JSON-able."""
        with self._lock:
            return copy.deepcopy(self._data)

    def validate(self, values: Mapping[str, Any], *, is_api: bool = False) -> dict[str, Any]:
        """The changes `values` would make, checked and normalised, without making them.

        Keys equal to their stored value, html keys, read-only keys and (with `is_api`) the keys
        A1111 keeps from the API are left out. Raises InvalidParameter naming the first bad key.
        """
        if not isinstance(values, Mapping):
            raise InvalidParameter("options must be an object of option name: value", field="options")
        changes: dict[str, Any] = {}
        with self._lock:
            unknown = sum(1 for k in self._data if k not in OPTIONS)
            for key, value in values.items():
                info = OPTIONS.get(key) if isinstance(key, str) else None
                if info is not None and (info.kind == "html" or info.read_only or (is_api and info.restrict_api)):
                    continue
                if key in self._data and same(self._data[key], value):
                    continue
                if info is None:
                    if key not in self._data:
                        unknown += 1
                        if unknown > MAX_UNKNOWN_KEYS:
                            raise InvalidParameter(f"too many unknown options (at most {MAX_UNKNOWN_KEYS})",
                                                   field=str(key))
                    changes[key] = _check_unknown(key, value)
                else:
                    changes[key] = check_value(key, value, info)
        return changes

    def set(self, values: Mapping[str, Any], *, is_api: bool = False) -> list[str]:
        """Check every value, then store them all (or, if any is bad, none); returns the keys changed.

        This only stores: switching the checkpoint or the VAE for `sd_model_checkpoint` / `sd_vae`
        is the caller's (it checks the name exists, switches, then sets).
        """
        with self._lock:
            changes = self.validate(values, is_api=is_api)
            self._data.update(changes)
            return list(changes)

    def record(self, key: str, value: Any) -> None:
        """A value the engine owns: the loaded checkpoint's title (sd_model_checkpoint) and sha256
        (sd_checkpoint_hash), or sd_vae after a fallback. Not checked against the API's rules."""
        with self._lock:
            if key in OPTIONS and OPTIONS[key].kind == "html":
                raise KeyError(key)
            self._data[key] = copy.deepcopy(value)

    # persistence
    def save(self, path: str | Path) -> None:
        """Write every stored key to `path` atomically: a half-written config.json never replaces a
        good one, even if the process dies while writing. Raises OSError if it cannot be written."""
        path = Path(path)
        with self._lock:
            text = json.dumps(self._data, indent=4, ensure_ascii=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def load(self, path: str | Path) -> str | None:
        """Replace the values with `path`'s; returns (and keeps in `load_error`) why the defaults were
        used instead, or None. A missing file is no error. A damaged one is moved aside to
        `<name>.corrupt`, so the next save does not destroy what the user may want back."""
        path = Path(path)
        self.load_warnings = []
        self.load_error = None
        try:
            data = json.loads(path.read_text(encoding="utf8"))
            if not isinstance(data, dict):
                raise ValueError(f"it holds a JSON {type(data).__name__}, not an object of settings")
        except FileNotFoundError:
            with self._lock:
                self._data = copy.deepcopy(self._defaults)
            return None
        except (OSError, ValueError) as e:
            reason = f"{path} could not be read as settings ({type(e).__name__}: {e})"
            aside = path.with_name(path.name + ".corrupt")
            try:
                os.replace(path, aside)
                reason += f"; it was moved to {aside.name}"
            except OSError:
                pass
            reason += "; the default settings are used"
            log.warning(reason)
            self.load_error = reason
            with self._lock:
                self._data = copy.deepcopy(self._defaults)
            return reason
        _migrate(data)
        fresh = copy.deepcopy(self._defaults)
        for key, value in data.items():
            info = OPTIONS.get(key)
            if info is None:
                if isinstance(key, str) and key:
                    fresh[key] = value
                continue
            if info.kind == "html":
                continue
            try:
                fresh[key] = check_value(key, value, info)
            except InvalidParameter as e:
                self.load_warnings.append(f"{e} (in {path.name}; the default {self._defaults[key]!r} is used)")
        for warning in self.load_warnings:
            log.warning(warning)
        with self._lock:
            self._data = fresh
        return None

    @classmethod
    def from_file(cls, path: str | Path, defaults: Mapping[str, Any] | None = None) -> "Options":
        opts = cls(defaults)
        opts.load(path)
        return opts


def _migrate(data: dict) -> None:
    """AUTOMATIC1111's migrations of keys from older versions (its Options.load)."""
    if data.get("sd_vae_as_default") is not None and data.get("sd_vae_overrides_per_model_preferences") is None:
        data["sd_vae_overrides_per_model_preferences"] = not data.get("sd_vae_as_default")
    if isinstance(data.get("quicksettings"), str) and data.get("quicksettings_list") is None:
        data["quicksettings_list"] = [i.strip() for i in data["quicksettings"].split(",")]
    if isinstance(data.get("ui_reorder"), str) and data.get("ui_reorder") and "ui_reorder_list" not in data:
        data["ui_reorder_list"] = [i.strip() for i in data["ui_reorder"].split(",")]


# -- the settings page -----------------------------------------------------------------------
def sections(only_effective: bool = True) -> list[dict]:
    """The sections of a Settings tab, grouped as AUTOMATIC1111 groups them: by category in the
    order it registers them (then the uncategorised ones), the sections of a category sorted by
    label (its `Options.reorder`). Each: {"id", "label", "category", "options": [{"key", "label",
    "kind", "default", "choices", "choices_from", "minimum", "maximum", "takes_effect"}]}. The
    hidden section is left out; with `only_effective` only the keys the engine honours."""
    order = list(CATEGORIES)
    grouped: dict[tuple[str | None, str], list[dict]] = {}
    for key, info in OPTIONS.items():
        if info.section[0] is None or info.kind == "html" or info.read_only:
            continue
        if only_effective and not info.takes_effect:
            continue
        grouped.setdefault(info.section, []).append({
            "key": key, "label": info.label, "kind": info.kind, "default": copy.deepcopy(info.default),
            "choices": list(info.choices) if info.choices is not None else None, "choices_from": info.choices_from,
            "minimum": info.minimum, "maximum": info.maximum, "takes_effect": info.takes_effect})

    def sort_key(section):
        category = SECTION_CATEGORIES.get(section)
        return (order.index(category) if category in order else len(order), section[1])

    return [{"id": s[0], "label": s[1], "category": CATEGORIES.get(SECTION_CATEGORIES.get(s), "Uncategorized"),
             "options": grouped[s]} for s in sorted(grouped, key=sort_key)]
