"""SD upscale: AUTOMATIC1111's img2img script that enlarges a picture tile by tile.

The init image is upscaled with a pixel upscaler (`scale_factor`, by the upscaler at
`upscaler_index` of `upscaler.list_upscalers`: None, Lanczos, Nearest, then the ESRGAN models),
cut into tiles of the job's width x height that overlap by `overlap` pixels
(`images.split_grid`), each tile is run through img2img (batch_size tiles at a time, the seed
going up by one per batch), and the tiles are put back with their overlaps blended
(`images.combine_grid`). `n_iter` makes that many upscales, seed + n each.

    result = run_sd_upscale(model, p, [None, 64, 1, 2])   # AUTOMATIC1111's script_args: info, overlap,
                                                          # upscaler_index, scale_factor
    result.images[0]                                      # the upscaled picture

Nothing here imports Gradio.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

from PIL import Image

from modules import images as images_module
from modules import processing, upscaler
from modules.errors import InvalidParameter, UserError
from modules.job_state import JobState
from modules.processing import Processed, StableDiffusionProcessingImg2Img

SD_UPSCALE = "SD upscale"
MAX_RESULT_SIDE = 4096  # the upscaled picture (many tiles of at most 2048 px each)


def parse_args(args: Any, models_dir=None) -> tuple[int, upscaler.UpscalerInfo, float]:
    """AUTOMATIC1111's positional `[info, overlap, upscaler_index, scale_factor]` (the info text is
    ignored; `[overlap, upscaler_index, scale_factor]` also works), or a dict of those names; the
    upscaler may be given by name (`upscaler_name`, or a string in the index's place)."""
    if isinstance(args, dict):
        overlap = args.get("overlap", 64)
        index = args.get("upscaler_name", args.get("upscaler_index", 0))
        scale = args.get("scale_factor", 2)
    elif isinstance(args, (list, tuple)):
        values = list(args)
        if len(values) == 4:
            values = values[1:]
        if len(values) != 3:
            raise InvalidParameter("script_args of SD upscale are [info, overlap, upscaler_index, scale_factor]",
                                   field="script_args")
        overlap, index, scale = values
    else:
        raise InvalidParameter("script_args of SD upscale must be a list or an object", field="script_args")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not float(overlap).is_integer() \
            or not 0 <= overlap <= 256:
        raise InvalidParameter(f"SD upscale: tile overlap must be a whole number from 0 to 256, got {overlap!r}",
                               field="script_args")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 1 <= scale <= 4:
        raise InvalidParameter(f"SD upscale: scale factor must be between 1 and 4, got {scale!r}", field="script_args")
    upscalers = upscaler.list_upscalers(models_dir)
    if isinstance(index, str):
        info = upscaler.find_upscaler(index, models_dir, field="script_args")
    elif isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(upscalers):
        info = upscalers[index]
    else:
        raise InvalidParameter(f"SD upscale: upscaler_index {index!r} is not one of 0..{len(upscalers) - 1} "
                               f"({', '.join(u.name for u in upscalers)})", field="script_args")
    return int(overlap), info, float(scale)


def run_sd_upscale(model, p: StableDiffusionProcessingImg2Img, args: Any, hooks=(), state: JobState | None = None,
                   process: Callable[..., Processed] | None = None) -> Processed:
    """Upscale `p.init_images[0]`, img2img every tile at p.width x p.height, recombine (see the module docstring)."""
    if not isinstance(p, StableDiffusionProcessingImg2Img):
        raise InvalidParameter("SD upscale is an img2img script", field="script_name")
    process = process or processing.process_images
    state = state or JobState()
    overlap, info, scale_factor = parse_args(args, p.upscaler_models_dir)
    processing.validate(p, model)
    if overlap >= min(p.width, p.height):
        raise InvalidParameter(f"SD upscale: the tile overlap ({overlap}) must be smaller than the tile "
                               f"({p.width}x{p.height})", field="script_args")
    init_img = images_module.flatten(p.init_images[0])
    target = (int(init_img.width * scale_factor) // 8 * 8, int(init_img.height * scale_factor) // 8 * 8)
    if max(target) > MAX_RESULT_SIDE:
        raise InvalidParameter(f"SD upscale would make a {target[0]}x{target[1]} picture; at most {MAX_RESULT_SIDE} "
                               "px a side", field="script_args")
    if min(target) < min(p.width, p.height):
        raise InvalidParameter(f"SD upscale: the upscaled picture ({target[0]}x{target[1]}) is smaller than a tile "
                               f"({p.width}x{p.height})", field="script_args")

    job = copy.deepcopy(p)
    job.mask = job.latent_mask = None  # tiles of the whole picture: nothing to mask
    job.seed, job.subseed = processing.fix_seed(p.seed), processing.fix_seed(p.subseed)
    job.extra_generation_params = {**p.extra_generation_params, "SD upscale overlap": overlap,
                                   "SD upscale upscaler": info.name}
    if info.name != "None":
        img = upscaler.upscale(init_img, info, scale_factor, allow_pickle=p.allow_pickle_upscalers, device=model.device)
    else:
        img = init_img
    grid = images_module.split_grid(img, tile_w=p.width, tile_h=p.height, overlap=overlap)
    batch_size, upscale_count = p.batch_size, p.n_iter
    job.n_iter, job.do_not_save_samples = 1, True
    work = [tile for _, _, row in grid.tiles for _, _, tile in row]
    batch_count = math.ceil(len(work) / batch_size)

    results, infotexts, first = [], [], None
    saved, interrupted = [], False
    for n in range(upscale_count):
        seed = job.seed + n  # AUTOMATIC1111: upscale n starts at seed + n
        q = copy.deepcopy(job)
        q.seed = seed
        work_results = []
        for i in range(batch_count):
            if state.interrupted:
                interrupted = True
                break
            q.init_images = work[i * batch_size:(i + 1) * batch_size]
            q.batch_size = batch_size
            state.textinfo = f"SD upscale: batch {i + 1 + n * batch_count} of {batch_count * upscale_count}"
            processed = process(model, q, hooks=hooks, state=state)
            first = first or processed
            interrupted = interrupted or processed.interrupted
            q.seed = processed.seed + 1
            work_results += processed.images
        index = 0
        for _, _, row in grid.tiles:
            for tiledata in row:
                tiledata[2] = work_results[index] if index < len(work_results) else Image.new("RGB", (p.width, p.height))
                index += 1
        combined = images_module.combine_grid(grid)
        results.append(combined)
        text = first.infotexts[0] if first is not None and first.infotexts else ""
        infotexts.append(text)
        if not p.do_not_save_samples:
            saved.append(str(images_module.save_image(combined, p.outpath_samples, seed, text, p.opts.saving)))
        if interrupted:
            break
    state.textinfo = None
    if first is None:
        raise UserError("SD upscale was interrupted before its first tile")
    seeds = [job.seed + n for n in range(len(results))]
    return Processed(
        images=results, infotexts=infotexts, prompt=p.prompt, negative_prompt=p.negative_prompt, seed=job.seed,
        subseed=job.subseed, all_prompts=[p.prompt] * len(results), all_negative_prompts=[p.negative_prompt] * len(results),
        all_seeds=seeds, all_subseeds=[job.subseed] * len(results), subseed_strength=p.subseed_strength,
        width=p.width, height=p.height, sampler_name=first.sampler_name, cfg_scale=p.cfg_scale, steps=p.steps,
        batch_size=p.batch_size, clip_skip=p.clip_skip, sd_model_name=model.name, sd_model_hash=model.shorthash,
        job_timestamp=first.job_timestamp, interrupted=interrupted, saved_paths=saved,
        denoising_strength=p.denoising_strength, is_using_inpainting_conditioning=first.is_using_inpainting_conditioning,
        extra_generation_params=dict(job.extra_generation_params))
