"""Users' own checkpoints: SD 1.x, SD 2.x (v-prediction) and SDXL base, as diffusers folders and as
single .safetensors files in the original layout; listing, titles, hash cache, and the refusals.

The models are tiny random-weight pipelines built with diffusers (tests/tiny_checkpoints.py);
everything loads offline (HF_HUB_OFFLINE=1, set in conftest).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from modules import processing, sd_models
from modules.conditioning import CondDict, stack_padded
from modules.errors import ModelLoadError, ModelNotFound
from modules.processing import StableDiffusionProcessingTxt2Img
from tests import tiny_checkpoints as tc

PROMPT, NEGATIVE = "a red circle", "blue square"


def txt2img(model, steps: int = 4, **kw):
    p = StableDiffusionProcessingTxt2Img(**{**dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, cfg_scale=7.0,
                                                   sampler_name="DDIM", seed=5, width=64, height=64,
                                                   do_not_save_samples=True), **kw})
    return processing.process_images(model, p)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """root/{sd1,sd2-v,sdxl} folders and root/{sd1,sd2-v,sdxl}.safetensors."""
    root = tmp_path_factory.mktemp("Stable-diffusion")
    out = {}
    for arch in ("sd1", "sd2-v", "sdxl"):
        meta = {"modelspec.prediction_type": "v"} if arch == "sd2-v" else None
        out[arch] = tc.build(arch, root, metadata=meta)
    out["root"] = root
    return out


def ddim_reference(pipe_cls, folder: Path, steps: int, seed: int = 5, size: int = 64) -> np.ndarray:
    """diffusers' own pipeline with a DDIMScheduler from the folder's scheduler config, same noise."""
    from diffusers import DDIMScheduler

    pipe = pipe_cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((4, size // 8, size // 8), generator=torch.Generator("cpu").manual_seed(seed))[None]
    image = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.0, height=size,
                 width=size, latents=latents, output_type="np").images[0]
    return (image * 255).round()


# -- loading and sampling --------------------------------------------------------------------
def test_ldm_layout_is_the_one_diffusers_converts():
    """Our test writer (diffusers -> original layout) is the exact inverse of diffusers' convert_ldm_*."""
    for arch in ("sd1", "sdxl"):
        unet, vae, _, _ = tc.build_models(arch)
        tc.check_round_trip(unet, vae)


@pytest.mark.parametrize("arch,expected,prediction", [("sd1", "sd1", "epsilon"), ("sd2-v", "sd2", "v_prediction"),
                                                      ("sdxl", "sdxl", "epsilon")])
def test_single_file_equals_folder(ckpts, arch, expected, prediction):
    folder, file = ckpts[arch]
    a = sd_models.load_model(folder, device="cpu")
    b = sd_models.load_model(file, device="cpu")
    assert a.arch == b.arch == expected
    assert a.prediction_type == b.prediction_type == prediction
    img_a, img_b = txt2img(a).images[0], txt2img(b).images[0]
    assert img_a.size == (64, 64)
    assert np.array_equal(pixels(img_a), pixels(img_b))
    if arch == "sdxl":
        assert b.latent_rgb[0] == sd_models.SDXL_LATENT_RGB


def test_v_prediction_equals_diffusers_ddim(ckpts):
    from diffusers import StableDiffusionPipeline

    folder, file = ckpts["sd2-v"]
    model = sd_models.load_model(file, device="cpu")
    assert model.prediction_type == "v_prediction" and model.prediction_type_source == "metadata"
    ours = pixels(txt2img(model, steps=5).images[0])
    ref = ddim_reference(StableDiffusionPipeline, folder, steps=5)
    assert np.abs(ours - ref).max() <= 1
    eps_read = model.scheduler_config | {"prediction_type": "epsilon"}
    model.scheduler_config = eps_read  # the same weights read as epsilon give another image
    assert np.abs(pixels(txt2img(model, steps=5).images[0]) - ours).mean() > 1


def test_sdxl_equals_diffusers_ddim(ckpts):
    from diffusers import StableDiffusionXLPipeline

    folder, file = ckpts["sdxl"]
    model = sd_models.load_model(file, device="cpu")
    ours = pixels(txt2img(model, steps=4).images[0])
    ref = ddim_reference(StableDiffusionXLPipeline, folder, steps=4)
    assert np.abs(ours - ref).max() <= 1


def test_sdxl_conditioning_pads_and_batches(ckpts):
    model = sd_models.load_model(ckpts["sdxl"][1], device="cpu")
    short, empty = model.get_learned_conditioning("a"), model.get_learned_conditioning("")
    long = model.get_learned_conditioning(", ".join(["word"] * 60))  # two chunks
    assert isinstance(short, CondDict) and short["crossattn"].shape == (1, 77, 80) and short["vector"].shape == (1, 48)
    assert long.shape[1] == 154
    batch = stack_padded([short, long], empty).to("cpu", torch.float32)
    assert batch["crossattn"].shape == (2, 154, 80) and batch["vector"].shape == (2, 48)
    torch.testing.assert_close(batch["crossattn"][0:1, 77:], empty["crossattn"], rtol=0, atol=0)
    torch.testing.assert_close(batch["vector"][0:1], short["vector"], rtol=0, atol=0)
    mixed = empty + 0.5 * (short - empty)  # the negative-weight interpolation works on both parts
    torch.testing.assert_close(mixed["vector"], (empty["vector"] + short["vector"]) / 2)


def test_sd2_prediction_type_from_yaml_or_unet_test(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    plain = tmp_path / "sd2-plain.safetensors"
    save_file(load_file(str(ckpts["sd2-v"][1])), str(plain))  # no metadata
    (tmp_path / "sd2-plain.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    m = sd_models.load_model(plain, device="cpu")
    assert (m.prediction_type, m.prediction_type_source) == ("v_prediction", "yaml")
    (tmp_path / "sd2-plain.yaml").unlink()
    m = sd_models.load_model(plain, device="cpu")
    assert m.prediction_type_source == "unet-test" and m.prediction_type in ("epsilon", "v_prediction")


# -- refusals, and the previous model keeps serving --------------------------------------------
def test_bad_files_give_clear_errors_and_previous_model_keeps_serving(ckpts, tmp_path):
    current = sd_models.load_model(ckpts["sd1"][1], device="cpu")
    before = pixels(txt2img(current, steps=2).images[0])
    data = ckpts["sd1"][1].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(4096))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    from safetensors.torch import save_file

    vae_only = tmp_path / "vae-only.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)},
              str(vae_only))
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, pickle)
    cases = [(truncated, "truncated or corrupt"), (corrupt, "truncated or corrupt"), (empty, "truncated or corrupt"),
             (vae_only, "unknown architecture"), (pickle, "allow-pickle-checkpoints")]
    for path, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            sd_models.switch_model(current, path, device="cpu")
    with pytest.raises(ModelNotFound):
        sd_models.switch_model(current, tmp_path / "missing.safetensors", device="cpu")
    assert np.array_equal(pixels(txt2img(current, steps=2).images[0]), before)


def test_pickles_load_only_with_the_flag_and_only_tensors(ckpts, tmp_path):
    from safetensors.torch import load_file

    pickle = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(str(ckpts["sd1"][1])), "global_step": 10}, pickle)
    with pytest.raises(ModelLoadError, match="pickle"):
        sd_models.load_model(pickle, device="cpu")
    model = sd_models.load_model(pickle, device="cpu", allow_pickle=True)
    ref = sd_models.load_model(ckpts["sd1"][1], device="cpu")
    assert np.array_equal(pixels(txt2img(model, steps=2).images[0]), pixels(txt2img(ref, steps=2).images[0]))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, evil)
    with pytest.raises(ModelLoadError, match="weights_only"):
        sd_models.load_model(evil, device="cpu", allow_pickle=True)


def test_switch_frees_previous_model(ckpts):
    old = sd_models.load_model(ckpts["sd1"][1], device="cpu")
    new = sd_models.switch_model(old, ckpts["sd2-v"][1], device="cpu")
    assert new.arch == "sd2" and next(old.unet.parameters()).is_meta


# -- listing, titles, hash cache, names from the UI/API --------------------------------------
def test_listing_titles_and_hash_cache(ckpts, tmp_path):
    root = ckpts["root"]
    (root / "sub").mkdir(exist_ok=True)
    nested = root / "sub" / "nested.safetensors"
    nested.write_bytes(ckpts["sd1"][1].read_bytes())
    cache_file = tmp_path / "hashes.json"
    cache = sd_models.HashCache(cache_file)
    infos = sd_models.list_checkpoints([root], hash_cache=cache)
    names = [i.name for i in infos]
    assert names == ["sd1", "sd1.safetensors", "sd2-v", "sd2-v.safetensors", "sdxl", "sdxl.safetensors",
                     "sub/nested.safetensors"]
    sha = hashlib.sha256(ckpts["sd1"][1].read_bytes()).hexdigest()
    info = infos[1]
    assert info.sha256 == sha and info.title == f"sd1.safetensors [{sha[:10]}]" and info.model_name == "sd1"
    assert cache.computed == len(infos) and cache_file.is_file()
    again = sd_models.HashCache(cache_file)  # a new process: everything comes from the file
    assert [i.title for i in sd_models.list_checkpoints([root], hash_cache=again)] == [i.title for i in infos]
    assert again.computed == 0
    os.utime(nested, (1, 1))  # a changed file is hashed again
    sd_models.list_checkpoints([root], hash_cache=again)
    assert again.computed == 1
    # --ckpt: a file given directly is listed as itself
    assert [i.name for i in sd_models.list_checkpoints([nested], hash_cache=again)] == ["nested.safetensors"]


def test_find_checkpoint_and_path_traversal(ckpts, tmp_path):
    root = ckpts["root"]
    cache = sd_models.HashCache(tmp_path / "hashes.json")
    title = next(i.title for i in sd_models.list_checkpoints([root], hash_cache=cache) if i.name == "sdxl.safetensors")
    for name in (title, "sdxl.safetensors", "sdxl.safetensors [0000000000]", title.split("[")[1][:-1]):
        assert sd_models.find_checkpoint(name, [root], hash_cache=cache).name == "sdxl.safetensors"
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(ckpts["sd1"][1].read_bytes())
    for name in ("../outside.safetensors", str(outside), "sub/../../outside.safetensors", "..\\outside.safetensors",
                 "~/outside.safetensors", "", "C:\\x.safetensors", "nothing.safetensors"):
        with pytest.raises(ModelNotFound):
            sd_models.find_checkpoint(name, [root], hash_cache=cache)
    with pytest.raises(ModelNotFound):
        sd_models.resolve_checkpoint_path(root / ".." / outside.name, [root])


def test_load_kwargs_from_flags():
    from types import SimpleNamespace

    kw = sd_models.load_kwargs_from_args(SimpleNamespace(device="cuda", no_half=True, medvram=True,
                                                         allow_pickle_checkpoints=True))
    assert kw == {"device": "cuda", "allow_pickle": True, "dtype": torch.float32, "offload": "medvram"}
    kw = sd_models.load_kwargs_from_args(SimpleNamespace(precision="full", no_half_vae=True, lowvram=True))
    assert kw["dtype"] == torch.float32 and kw["vae_dtype"] == torch.float32 and kw["offload"] == "lowvram"


def test_old_sd1_text_encoder_layout(ckpts, tmp_path):
    """SD 1.x files written with old transformers have `cond_stage_model.transformer.embeddings...`."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ckpts["sd1"][1]))
    old = tmp_path / "old.safetensors"
    save_file({k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
               for k, v in sd.items()}, str(old))
    a, b = sd_models.load_model(ckpts["sd1"][1], device="cpu"), sd_models.load_model(old, device="cpu")
    torch.testing.assert_close(a.get_learned_conditioning("a cat"), b.get_learned_conditioning("a cat"),
                               rtol=0, atol=0)


@pytest.mark.parametrize("folder,arch", [("sd15", "sd1"), ("sd2-v", "sd2"), ("sdxl-base", "sdxl")])
def test_real_size_configs_are_inferred_from_shapes(folder, arch, tmp_path):
    """A real SD 1.5 / 2.1 / SDXL base checkpoint's shapes (built on the meta device, no memory) give
    back exactly the shipped configs: the loader would build the right modules for a real file."""
    import accelerate
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from modules import sd_models_config

    cfg = lambda c: sd_models_config.read_config(folder, c)  # noqa: E731
    with accelerate.init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg("unet"))
        vae = AutoencoderKL.from_config(cfg("vae"))
        te = [CLIPTextModel(CLIPTextConfig(**cfg("text_encoder")))]
        if arch == "sdxl":
            te.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg("text_encoder_2"))))
    ldm = {**tc.unet_to_ldm(unet.state_dict(), unet.config), **tc.vae_to_ldm(vae.state_dict(), vae.config)}
    if arch == "sdxl":
        ldm.update(tc.clip_to_ldm(te[0].state_dict(), "conditioner.embedders.0.transformer."))
        ldm.update(tc.openclip_to_ldm(te[1].state_dict(), "conditioner.embedders.1.model."))
    elif arch == "sd2":
        ldm.update(tc.openclip_to_ldm(te[0].state_dict(), "cond_stage_model.model.", extra_layer=True))
    else:
        ldm.update(tc.clip_to_ldm(te[0].state_dict(), "cond_stage_model.transformer."))
    shapes = {k: tuple(v.shape) for k, v in ldm.items()}
    got = sd_models_config.build_configs(shapes, tmp_path / "real.safetensors", {"modelspec.prediction_type": "v"})
    assert got.arch == arch
    for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim",
                "down_block_types", "up_block_types", "use_linear_projection", "transformer_layers_per_block",
                "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        default = False if key == "use_linear_projection" else None  # diffusers' default where the config omits it
        assert got.unet.get(key, default) == cfg("unet").get(key, default), key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "scaling_factor"):
        assert got.vae[key] == cfg("vae")[key], key
    for got_te, name in zip(got.text_encoders, ["text_encoder", "text_encoder_2"]):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act"):
            assert got_te[key] == cfg(name)[key], (name, key)


@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_cpu_offload_gives_the_same_image(ckpts, offload):
    """--medvram / --lowvram run through accelerate's offload hooks (on the CPU they move nothing,
    but the same code runs: inputs follow the execution device, weights come back from their rest)."""
    ref = sd_models.load_model(ckpts["sdxl"][1], device="cpu")
    model = sd_models.load_model(ckpts["sdxl"][1], device="cpu", offload=offload)
    assert model.execution_device == torch.device("cpu")
    assert np.array_equal(pixels(txt2img(model, steps=2, prompt="a (red:1.1) circle").images[0]),
                          pixels(txt2img(ref, steps=2, prompt="a (red:1.1) circle").images[0]))


def test_sdxl_crop_options_change_the_size_conditioning(ckpts):
    """AUTOMATIC1111's sdxl_crop_top / sdxl_crop_left (JobOptions) go into SDXL's time_ids: the image changes."""
    model = sd_models.load_model(ckpts["sdxl"][1], device="cpu")
    plain = pixels(txt2img(model, steps=2).images[0])
    crop = processing.JobOptions(sdxl_crop_top=256, sdxl_crop_left=128)
    assert np.abs(pixels(txt2img(model, steps=2, opts=crop).images[0]) - plain).mean() > 0
