"""img2img on the engine's one loop: parity with diffusers' img2img pipeline, resize modes, batches,
validation, infotext, tiling; and on the embedded model, a red circle turned blue."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules import images, processing, sd_hijack_tiling, sd_samplers
from modules.errors import InvalidParameter
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from modules.sd_samplers_common import img2img_steps
from modules.sd_samplers_diffusers import build_scheduler
from tests.test_engine import UNetRecorder

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"


def picture(w=64, h=64, color=(200, 30, 30)) -> Image.Image:
    im = Image.new("RGB", (w, h), (240, 240, 240))
    ImageDraw.Draw(im).ellipse((w // 4, h // 4, 3 * w // 4, 3 * h // 4), fill=color)
    return im


def img2img(**kw) -> StableDiffusionProcessingImg2Img:
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=10, cfg_scale=7.0, seed=5,
                    width=64, height=64, init_images=[picture()], do_not_save_samples=True)
    return StableDiffusionProcessingImg2Img(**{**defaults, **kw})


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


def diffusers_img2img(model_dir: Path, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, local_files_only=True, safety_checker=None,
                                                          requires_safety_checker=False, dtype=torch.float32)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler_name,steps,strength,cfg", [
    ("DDIM", 10, 0.5, 7.5), ("DDIM", 20, 0.75, 3.0), ("DDIM", 8, 1.0, 7.0),
    ("Euler", 10, 0.5, 7.5), ("Euler", 20, 0.75, 3.0), ("Euler", 12, 0.3, 1.0)])
def test_img2img_equals_diffusers_img2img_pipeline(tiny_model, tiny_model_dir, sampler_name, steps, strength, cfg):
    """Same start, same noise, same steps: within one 8-bit level of diffusers' StableDiffusionImg2ImgPipeline.

    AUTOMATIC1111's rule (ours) runs t_enc + 1 = int(strength * steps) + 1 steps (every step at
    strength 1), starting at sampling step `steps - t_enc - 1` of the `steps`-step schedule;
    diffusers runs int(strength' * steps) steps from step `steps - int(strength' * steps)`. So the
    reference gets strength' = (t_enc + 1) / steps: both start at the same step, noise the init
    latent to the same level (DDIM: sqrt(a_t) x0 + sqrt(1 - a_t) noise; Euler: x0 + sigma noise)
    and run the same steps. diffusers gets our init latent itself as `image` (a 4-channel tensor
    is taken as latents, so no VAE sampling on its side) and a generator seeded with the seed, whose
    first draw (its noise) is our image's first draw. Euler's reference scheduler is built by the
    same code as ours (the model's config with the Uniform schedule type's overrides).
    """
    p = img2img(sampler_name=sampler_name, steps=steps, denoising_strength=strength, cfg_scale=cfg)
    with UNetRecorder(tiny_model.unet) as rec:
        ours = pixels(processing.process_images(tiny_model, p).images[0])
    total, t_enc = img2img_steps(steps, strength)
    calls_per_step = 1
    assert len(rec.calls) == (t_enc + 1) * calls_per_step
    sampler = sd_samplers.create_sampler(sampler_name, tiny_model)
    if sampler_name == "DDIM":
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(tiny_model.scheduler_config)
    else:
        scheduler = build_scheduler(tiny_model, sampler.recipe, sampler.schedule)
    pipe = diffusers_img2img(tiny_model_dir, scheduler)
    init_latent = tiny_model.encode_first_stage(images.pil_to_tensor([picture()]))
    ref = pipe("a red circle", negative_prompt="blue square", image=init_latent, strength=min(1.0, (t_enc + 1) / steps + 1e-6),
               num_inference_steps=steps, guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(5),
               output_type="np").images[0]
    assert np.abs(ours - (ref * 255).round()).max() <= 1.0


def test_strength_decides_how_many_steps_run(tiny_model):
    seen = []
    processing.process_images(tiny_model, img2img(steps=20, denoising_strength=0.5),
                              hooks=[lambda i: seen.append((i.step, i.steps, i.pass_label))])
    assert seen == [(i, 11, "img2img") for i in range(11)]  # AUTOMATIC1111: int(0.5 * 20) + 1
    seen.clear()
    processing.process_images(tiny_model, img2img(steps=20, denoising_strength=0.5, img2img_fix_steps=True),
                              hooks=[lambda i: seen.append(i.step)])
    assert seen == list(range(20))  # "do exactly the amount of steps the slider specifies"


def test_low_strength_stays_close_to_the_init_image(tiny_model):
    init = pixels(picture())
    low = pixels(processing.process_images(tiny_model, img2img(denoising_strength=0.05, cfg_scale=1)).images[0])
    high = pixels(processing.process_images(tiny_model, img2img(denoising_strength=0.9, cfg_scale=1)).images[0])
    assert np.abs(low - init).mean() < np.abs(high - init).mean()


def test_resize_modes_and_sizes(tiny_model):
    wide = picture(96, 48)
    for mode in (0, 1, 2, 3):
        result = processing.process_images(tiny_model, img2img(init_images=[wide], resize_mode=mode, width=64,
                                                               height=32, steps=3))
        assert result.images[0].size == (64, 32)
    # a mask of another size than the init image is resized onto it, not refused
    mask = Image.new("L", (32, 16), 0)
    ImageDraw.Draw(mask).rectangle((8, 4, 23, 11), fill=255)
    result = processing.process_images(tiny_model, img2img(init_images=[wide], mask=mask, width=64, height=32,
                                                           steps=3, inpaint_full_res=False))
    assert result.images[0].size == (64, 32)
    only_masked = processing.process_images(tiny_model, img2img(init_images=[wide], mask=mask, width=64, height=32,
                                                                steps=3, inpaint_full_res=True, mask_blur=0))
    assert only_masked.images[0].size == (96, 48)  # pasted back into the init picture, at its size
    outside = np.asarray(mask.resize((96, 48), Image.Resampling.LANCZOS)) == 0  # the mask stretched onto it
    assert outside.sum() > 0.5 * outside.size
    assert np.array_equal(pixels(only_masked.images[0])[outside], pixels(wide)[outside])


def test_batches_of_init_images(tiny_model):
    a, b = picture(color=(200, 30, 30)), picture(color=(30, 30, 200))
    one = processing.process_images(tiny_model, img2img(init_images=[a], batch_size=3, steps=4))
    assert len(one.images) == 3 and one.all_seeds == [5, 6, 7]
    two = processing.process_images(tiny_model, img2img(init_images=[a, b], batch_size=2, n_iter=2, steps=4))
    assert len(two.images) == 4 and two.batch_size == 2
    single_b = processing.process_images(tiny_model, img2img(init_images=[b], seed=6, steps=4))
    assert np.abs(pixels(two.images[1]) - pixels(single_b.images[0])).max() <= 1  # image i: init i, seed + i
    fewer = processing.process_images(tiny_model, img2img(init_images=[a, b], batch_size=4, steps=2))
    assert len(fewer.images) == 2  # AUTOMATIC1111: fewer init images than the batch make the batch


@pytest.mark.parametrize("field,kw", [
    ("denoising_strength", dict(denoising_strength=1.5)),
    ("denoising_strength", dict(denoising_strength=-0.1)),
    ("init_images", dict(init_images=[])),
    ("init_images", dict(init_images=["not a picture"])),
    ("init_images", dict(init_images=[Image.new("RGB", (2056, 64))])),
    ("init_images", dict(init_images=[picture(), picture(), picture()], batch_size=2)),
    ("resize_mode", dict(resize_mode=4)),
    ("inpainting_fill", dict(inpainting_fill=5)),
    ("mask", dict(mask="nope")),
    ("mask_blur", dict(mask_blur=-1)),
])
def test_validation(tiny_model, field, kw):
    with pytest.raises(InvalidParameter) as e:
        processing.process_images(tiny_model, img2img(**kw))
    assert e.value.field == field and e.value.status_code == 422


def test_infotext_and_js(tiny_model, tmp_path):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    p = img2img(denoising_strength=0.6, mask=mask, mask_blur=3, inpainting_fill=2, inpaint_full_res=True,
                inpaint_full_res_padding=8, inpainting_mask_invert=1, initial_noise_multiplier=0.9, steps=3,
                do_not_save_samples=False, outpath_samples=str(tmp_path))
    result = processing.process_images(tiny_model, p)
    text = result.infotexts[0]
    assert images.read_info_from_image(Image.open(result.saved_paths[0])) == text
    assert "img2img-images" in StableDiffusionProcessingImg2Img().outpath_samples
    assert StableDiffusionProcessingTxt2Img().outpath_samples == "outputs/txt2img-images"
    fields = processing.infotext_fields(text)
    assert {k: fields[k] for k in ("denoising_strength", "mask_blur", "inpainting_fill", "inpaint_full_res",
                                   "inpaint_full_res_padding", "inpainting_mask_invert",
                                   "initial_noise_multiplier")} == dict(
        denoising_strength=0.6, mask_blur=3, inpainting_fill=2, inpaint_full_res=True, inpaint_full_res_padding=8,
        inpainting_mask_invert=1, initial_noise_multiplier=0.9)
    js = result.js()
    assert js["denoising_strength"] == 0.6 and js["is_using_inpainting_conditioning"] is False
    assert js["extra_generation_params"]["Mask blur"] == 3
    plain = processing.process_images(tiny_model, StableDiffusionProcessingTxt2Img(
        prompt="x", steps=2, width=64, height=64, do_not_save_samples=True))
    assert plain.js()["denoising_strength"] is None and "Denoising strength" not in plain.infotexts[0]


def _seam(image: Image.Image) -> float:
    """How much the picture jumps across its own left/right and top/bottom edges, against a step inside
    it: about 1 for a picture that tiles seamlessly."""
    a = pixels(image)
    wrap = np.abs(a[:, 0] - a[:, -1]).mean() + np.abs(a[0] - a[-1]).mean()
    inside = np.abs(a[:, 0] - a[:, 1]).mean() + np.abs(a[0] - a[1]).mean()
    return wrap / max(inside, 1e-6)


def test_tiling_wraps_around_and_is_undone(tiny_model):
    p = StableDiffusionProcessingTxt2Img(prompt="a red circle", steps=8, seed=3, width=64, height=64,
                                         do_not_save_samples=True)
    before = pixels(processing.process_images(tiny_model, p).images[0])
    tiled = processing.process_images(tiny_model, dataclasses.replace(p, tiling=True))
    assert "Tiling: True" in tiled.infotexts[0]
    plain = processing.process_images(tiny_model, p)
    # tiled: the jump across the wrap is like any step between neighbouring pixels; plain: a seam
    assert _seam(tiled.images[0]) < 1.2 and _seam(tiled.images[0]) < 0.7 * _seam(plain.images[0])
    assert all(layer.padding_mode == "zeros" for layer in sd_hijack_tiling.conv_layers(tiny_model))
    assert np.array_equal(before, pixels(plain.images[0]))  # a plain job after a tiled one: bit-equal
    i2i = processing.process_images(tiny_model, img2img(tiling=True, steps=4))
    assert i2i.images[0].size == (64, 64)
    assert processing.infotext_fields(tiled.infotexts[0])["tiling"] is True


def test_tiling_is_undone_after_an_error(tiny_model):
    def boom(info):
        raise RuntimeError("hook failed")

    with pytest.raises(RuntimeError):
        processing.process_images(tiny_model, img2img(tiling=True, steps=2), hooks=[boom])
    assert all(layer.padding_mode == "zeros" for layer in sd_hijack_tiling.conv_layers(tiny_model))


@pytest.fixture(scope="module")
def embedded():
    from modules import sd_models

    return sd_models.load_model(EMBEDDED, device="cpu")


def test_embedded_red_circle_turns_blue(embedded):
    """A generated red circle, img2img'd at strength 0.7 with `a blue circle on a white background`,
    comes back as a blue circle for most of 8 seeds (judged from pixels)."""
    from training.shapes import judge

    red = processing.process_images(embedded, StableDiffusionProcessingTxt2Img(
        prompt="a red circle on a white background", steps=20, seed=1, width=64, height=64, batch_size=4,
        do_not_save_samples=True))
    judged = [judge(np.asarray(im)) for im in red.images]
    init = next(im for im, j in zip(red.images, judged) if (j["color"], j["shape"]) == ("red", "circle"))
    result = processing.process_images(embedded, StableDiffusionProcessingImg2Img(
        prompt="a blue circle on a white background", init_images=[init], denoising_strength=0.7, steps=20,
        seed=100, batch_size=8, width=64, height=64, do_not_save_samples=True))
    colours = [judge(np.asarray(im))["color"] for im in result.images]
    assert colours.count("blue") >= 5, colours
