"""Inpainting: with any checkpoint (AUTOMATIC1111's latent blend and pixel paste-back), "only masked",
the fill modes, and inpainting checkpoints (9-channel UNet, SD 1.5 and SDXL layouts, folders and
single files) against diffusers' StableDiffusionInpaintPipeline."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules import images, masking, processing, sd_models, sd_models_config
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from modules.sd_samplers_cfg_denoiser import DenoiserOutput
from modules.sd_samplers_common import img2img_steps, to_eps, to_x0
from tests import tiny_checkpoints as tc
from tests.test_engine import UNetRecorder

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
BOX = (16, 24, 40, 48)  # x1, y1, x2, y2 (exclusive): on the 8-pixel latent grid


def picture(w=64, h=64) -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.full((h, w, 3), 230, np.uint8)
    base[..., 0] = np.linspace(40, 220, w, dtype=np.uint8)[None]
    base = (base.astype(int) + rng.integers(-10, 10, base.shape)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(base)
    ImageDraw.Draw(im).ellipse((10, 12, 50, 52), fill=(30, 60, 200))
    return im


def box_mask(w=64, h=64, box=BOX) -> Image.Image:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return m


def inside(box=BOX, w=64, h=64) -> np.ndarray:
    a = np.zeros((h, w), bool)
    a[box[1]:box[3], box[0]:box[2]] = True
    return a


def inpaint(**kw) -> StableDiffusionProcessingImg2Img:
    defaults = dict(prompt="a red circle", negative_prompt="blue square", steps=10, cfg_scale=7.0, seed=5, width=64,
                    height=64, init_images=[picture()], mask=box_mask(), mask_blur=0, inpaint_full_res=False,
                    denoising_strength=0.75, do_not_save_samples=True)
    return StableDiffusionProcessingImg2Img(**{**defaults, **kw})


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.float64)


class DecodeSpy:
    """Records the latents the job decodes (the result before the pixel paste-back)."""

    def __init__(self, model, monkeypatch):
        self.latents: list[torch.Tensor] = []
        real = model.decode_first_stage

        def spy(latents):
            self.latents.append(latents.clone())
            return real(latents)

        monkeypatch.setattr(model, "decode_first_stage", spy)


# ---- any checkpoint -----------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler_name", ["DDIM", "Euler", "Euler a", "DPM++ 2M"])
def test_unmasked_area_stays_the_init_image(tiny_model, monkeypatch, sampler_name):
    """Outside the (unblurred) mask the result's latent is the init latent exactly (the blend at every
    step, then AUTOMATIC1111's final `samples * nmask + init * mask`), and its pixels are the init
    image's exactly (the paste-back through the mask). Masked content "original", so the init latent
    is the init image's own (with "fill" it is the filled picture's)."""
    spy = DecodeSpy(tiny_model, monkeypatch)
    result = processing.process_images(tiny_model, inpaint(sampler_name=sampler_name, inpainting_fill=1))
    out, init = pixels(result.images[0]), pixels(picture())
    assert np.array_equal(out[~inside()], init[~inside()])
    assert np.abs(out[inside()] - init[inside()]).mean() > 5  # the masked area was repainted
    init_latent = tiny_model.encode_first_stage(images.pil_to_tensor([picture()]))
    keep = torch.ones(1, 4, 8, 8, dtype=torch.bool)
    keep[..., BOX[1] // 8:BOX[3] // 8, BOX[0] // 8:BOX[2] // 8] = False
    torch.testing.assert_close(spy.latents[0][keep], init_latent[keep], rtol=0, atol=0)


def test_blurred_mask_pastes_back_outside_the_blur(tiny_model):
    result = processing.process_images(tiny_model, inpaint(mask_blur=4))
    blurred = np.asarray(masking.blur_mask(box_mask(), 4, 4)) > 0
    assert blurred.sum() > inside().sum()  # the blur reaches past the box
    assert np.array_equal(pixels(result.images[0])[~blurred], pixels(picture())[~blurred])


@pytest.mark.parametrize("full_res", [False, True])
def test_all_black_mask_returns_the_init_image(tiny_model, full_res):
    result = processing.process_images(tiny_model, inpaint(mask=Image.new("L", (64, 64), 0),
                                                           inpaint_full_res=full_res, mask_blur=4))
    assert np.array_equal(pixels(result.images[0]), pixels(picture()))


def test_inverted_mask_keeps_the_masked_area(tiny_model):
    result = processing.process_images(tiny_model, inpaint(inpainting_mask_invert=1))
    out, init = pixels(result.images[0]), pixels(picture())
    assert np.array_equal(out[inside()], init[inside()])
    assert np.abs(out[~inside()] - init[~inside()]).mean() > 5
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]


def test_only_masked_works_on_the_box_at_full_size(tiny_model):
    """"Only masked": the mask's box (plus padding, grown to the job's aspect) is cut out, worked on at
    the job's width x height, and pasted back; the result has the init image's size."""
    big = picture(128, 96)
    mask = box_mask(128, 96, (80, 40, 104, 64))
    with UNetRecorder(tiny_model.unet) as rec:
        result = processing.process_images(tiny_model, inpaint(init_images=[big], mask=mask, inpaint_full_res=True,
                                                               inpaint_full_res_padding=8, width=64, height=64))
    assert result.images[0].size == (128, 96)
    assert {shape[-2:] for shape, _ in rec.calls} == {(8, 8)}  # the crop at 64x64, not the picture at 128x96
    region = masking.expand_crop_region(masking.get_crop_region(np.asarray(mask), 8), 64, 64, 128, 96)
    assert region == (72, 32, 112, 72)
    out, init = pixels(result.images[0]), pixels(big)
    outside = np.ones((96, 128), bool)
    outside[40:64, 80:104] = False
    assert np.array_equal(out[outside], init[outside])
    assert np.abs(out[~outside] - init[~outside]).mean() > 5
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_masked_content_modes(tiny_model, fill):
    result = processing.process_images(tiny_model, inpaint(inpainting_fill=fill, denoising_strength=0.5, steps=4))
    assert np.array_equal(pixels(result.images[0])[~inside()], pixels(picture())[~inside()])
    assert f"Masked content: {processing.INPAINTING_FILL[fill]}" in result.infotexts[0]


def test_crop_region_helpers():
    m = np.zeros((10, 20), np.uint8)
    assert masking.get_crop_region(m) is None
    m[2:4, 5:9] = 255
    assert masking.get_crop_region(m, 1) == (4, 1, 10, 5)
    assert masking.expand_crop_region((4, 1, 10, 5), 64, 64, 20, 10) == (4, 0, 10, 6)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    assert np.asarray(masking.create_binary_mask(rgba)).sum() == 255  # the alpha channel is the mask


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_masked_denoiser_keeps_its_outputs_consistent(prediction_type):
    """The blend is applied to pred_x0; model_output and eps are what would have produced it."""

    class Model:
        pass

    model = Model()
    model.prediction_type = prediction_type
    g = torch.Generator().manual_seed(0)
    x, out_raw = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    alpha = 0.3
    inner = lambda x_, t, a, step: DenoiserOutput(out_raw, to_eps(out_raw, x_, a, prediction_type),  # noqa: E731
                                                  to_x0(out_raw, x_, a, prediction_type),
                                                  {"prompt": to_x0(out_raw, x_, a, prediction_type)})
    init = torch.randn(2, 4, 4, 4, generator=g)
    nmask = torch.zeros(4, 4, 4)
    nmask[:, :2] = 1
    d = masking.MaskedDenoiser(inner, model, init, 1 - nmask, nmask)
    out = d(x, 500, alpha, 0)
    expected = init * (1 - nmask) + nmask * to_x0(out_raw, x, alpha, prediction_type)
    torch.testing.assert_close(out.pred_x0, expected)
    torch.testing.assert_close(to_x0(out.model_output, x, alpha, prediction_type), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(to_eps(out.model_output, x, alpha, prediction_type), out.eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.branches["prompt"], expected)


def test_image_conditioning_rows_follow_the_branches():
    ic = torch.arange(2.0).view(2, 1, 1, 1).expand(2, 5, 2, 2)
    plain = masking.ImageConditionedModel(None, ic, torch.tensor([0, 1]))
    assert plain.rows_for(4)[:, 0, 0, 0].tolist() == [0, 1, 0, 1]  # [uncond | cond]
    parts = masking.ImageConditionedModel(None, ic, torch.tensor([0, 0, 1]))  # image 0 has two AND parts
    assert parts.rows_for(5)[:, 0, 0, 0].tolist() == [0, 1, 0, 0, 1]  # [base | parts]
    assert parts.rows_for(7)[:, 0, 0, 0].tolist() == [0, 1, 0, 0, 1, 0, 1]  # [empty | parts | negative]


# ---- inpainting checkpoints -----------------------------------------------------------------------------

def inpainting_models(arch: str, seed: int = 0):
    """tiny_checkpoints' models with the UNet made 9-channel (4 latent + mask + 4 masked-image latent)."""
    from diffusers import UNet2DConditionModel

    unet, vae, te, sched = tc.build_models(arch, seed)
    torch.manual_seed(seed + 1)
    unet9 = UNet2DConditionModel(**{**{k: v for k, v in unet.config.items() if not k.startswith("_")},
                                    "in_channels": 9}).eval()
    return unet9, vae, te, sched


@pytest.fixture(scope="module")
def inpainting_ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpainting")
    unet, vae, te, sched = inpainting_models("sd1")
    folder = tc.save_folder(root / "sd15-inpainting", unet, vae, te, sched)
    file = tc.save_single_file(root / "sd15-inpainting.safetensors", unet, vae, te)
    unet_xl, vae_xl, te_xl, sched_xl = inpainting_models("sdxl")
    xl_file = tc.save_single_file(root / "sdxl-inpainting.safetensors", unet_xl, vae_xl, te_xl)
    return folder, file, xl_file


@pytest.fixture(scope="module")
def sd15_inpainting(inpainting_ckpts):
    return sd_models.load_model(inpainting_ckpts[0], device="cpu")


def test_inpainting_checkpoints_are_detected_from_weights(inpainting_ckpts, sd15_inpainting, monkeypatch):
    folder, file, xl_file = inpainting_ckpts
    assert sd15_inpainting.is_inpainting and sd15_inpainting.latent_channels == 4
    read = []
    real = sd_models_config.read_config
    monkeypatch.setattr(sd_models_config, "read_config", lambda f, *a, **k: read.append(f) or real(f, *a, **k))
    single = sd_models.load_model(file, device="cpu")
    assert single.is_inpainting and single.arch == "sd1" and "sd15-inpainting" in read
    xl = sd_models.load_model(xl_file, device="cpu")
    assert xl.is_inpainting and xl.arch == "sdxl" and "sdxl-inpainting" in read
    # the folder and the single file are the same model
    p = inpaint(steps=3)
    a = processing.process_images(sd15_inpainting, p)
    b = processing.process_images(single, inpaint(steps=3))
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).max() <= 1
    assert a.js()["is_using_inpainting_conditioning"] is True


def test_inpainting_checkpoint_equals_diffusers_inpaint_pipeline(inpainting_ckpts, sd15_inpainting):
    """Within one 8-bit level of diffusers' StableDiffusionInpaintPipeline (DDIM, same start, same noise).

    The UNet input is the same: `cat([x, mask, masked image latents])`, the mask rounded to 0/1 and
    nearest-resized to the latent, the masked image `image * (mask < 0.5)`. Two things differ by
    design and are matched here: (1) AUTOMATIC1111 (ours) also blends the unmasked area back to the
    init image at every step, which diffusers does only for 4-channel UNets; for DDIM (eta 0) our
    blend of pred_x0 with eps recomputed from it puts the unmasked latent exactly at
    `add_noise(init, noise, t_next)` after each step, so the reference's step callback sets it there
    (diffusers' own 4-channel rule), and to the init latent after the last step; (2) the start: as in
    test_img2img, diffusers' strength is (t_enc + 1) / steps, and it is given our init latent as
    `image`, our masked-image latents as `masked_image_latents` and a generator seeded with the seed
    (its first draw is our noise). Our paste-back only touches pixels outside the mask, so the two are
    compared inside it (outside, ours is the init image exactly).
    """
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    model, steps, strength, cfg = sd15_inpainting, 10, 0.5, 7.5
    with UNetRecorder(model.unet) as rec:
        ours = pixels(processing.process_images(model, inpaint(steps=steps, denoising_strength=strength, cfg_scale=cfg,
                                                               inpainting_fill=1)).images[0])
    assert {shape[1] for shape, _ in rec.calls} == {9}
    _, t_enc = img2img_steps(steps, strength)
    source = images.pil_to_tensor([picture()])
    m = torch.from_numpy(np.asarray(box_mask(), np.float32) / 255)[None, None]
    init_latent = model.encode_first_stage(source)
    masked_latents = model.encode_first_stage(source * (1 - m))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    nmask = masking.latent_masks(box_mask(), (4, 8, 8), "cpu", torch.float32)[1][None]

    pipe = StableDiffusionInpaintPipeline(  # the same modules the engine loaded from the folder
        vae=model.vae, text_encoder=model.cond_stage.text_encoder, tokenizer=model.cond_stage.tokenizer,
        unet=model.unet, scheduler=DDIMScheduler.from_config(model.scheduler_config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    stride = 1000 // steps

    def blend(pipeline, i, t, kwargs):
        t_next = int(t) - stride
        kept = init_latent if t_next < 0 else pipeline.scheduler.add_noise(init_latent, noise, torch.tensor([t_next]))
        return {"latents": (1 - nmask) * kept + nmask * kwargs["latents"]}

    ref = pipe("a red circle", negative_prompt="blue square", image=init_latent, mask_image=box_mask(),
               masked_image_latents=masked_latents, strength=min(1.0, (t_enc + 1) / steps + 1e-6), num_inference_steps=steps,
               guidance_scale=cfg, generator=torch.Generator("cpu").manual_seed(5), callback_on_step_end=blend,
               output_type="np").images[0]
    ref = (ref * 255).round()
    assert np.abs(ours[inside()] - ref[inside()]).max() <= 1.0
    assert np.array_equal(ours[~inside()], pixels(picture())[~inside()])


def test_inpainting_checkpoint_txt2img_and_hires(sd15_inpainting):
    """txt2img on an inpainting checkpoint: a mask of ones and the latents of a grey picture (AUTOMATIC1111)."""
    with UNetRecorder(sd15_inpainting.unet) as rec:
        result = processing.process_images(sd15_inpainting, StableDiffusionProcessingTxt2Img(
            prompt="x", steps=2, width=64, height=64, enable_hr=True, hr_scale=1.5, do_not_save_samples=True))
    assert result.images[0].size == (96, 96)
    assert {shape[1] for shape, _ in rec.calls} == {9}
    assert result.js()["is_using_inpainting_conditioning"] is True


def test_sdxl_inpainting_single_file_runs(inpainting_ckpts):
    xl = sd_models.load_model(inpainting_ckpts[2], device="cpu")
    with UNetRecorder(xl.unet) as rec:
        result = processing.process_images(xl, inpaint(steps=2, inpaint_full_res=True, inpaint_full_res_padding=4))
    assert {shape[1] for shape, _ in rec.calls} == {9}
    assert np.array_equal(pixels(result.images[0])[~inside()], pixels(picture())[~inside()])


# ---- the embedded model ------------------------------------------------------------------------------

def test_embedded_inpainting_keeps_the_background():
    """A generated red square; its box inpainted with `a green triangle on a white background`: every
    pixel outside the box's blurred mask is the generated picture's."""
    from training.shapes import judge

    model = sd_models.load_model(EMBEDDED, device="cpu")
    squares = processing.process_images(model, StableDiffusionProcessingTxt2Img(
        prompt="a red square on a white background", steps=20, seed=3, width=64, height=64, batch_size=4,
        do_not_save_samples=True))
    init = next((im for im in squares.images if judge(np.asarray(im))["color"] == "red"), squares.images[0])
    a = np.asarray(init).astype(np.float32)
    obj = np.sqrt(((a - np.median(a[:2].reshape(-1, 3), axis=0)) ** 2).sum(-1)) > 60
    ys, xs = np.nonzero(obj)
    box = (max(xs.min() - 2, 0), max(ys.min() - 2, 0), min(xs.max() + 3, 64), min(ys.max() + 3, 64))
    mask = box_mask(64, 64, box)
    result = processing.process_images(model, StableDiffusionProcessingImg2Img(
        prompt="a green triangle on a white background", init_images=[init], mask=mask, denoising_strength=0.9,
        steps=20, seed=11, width=64, height=64, inpaint_full_res=False, inpainting_fill=1,
        do_not_save_samples=True))
    blurred = np.asarray(masking.blur_mask(mask, 4, 4)) > 0
    out = pixels(result.images[0])
    assert np.array_equal(out[~blurred], pixels(init)[~blurred])
    assert np.abs(out[blurred] - pixels(init)[blurred]).mean() > 3  # the box was repainted
