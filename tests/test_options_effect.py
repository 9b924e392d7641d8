"""Options that take effect: each one, set on the server, changes what the next job makes.

Jobs go through the one job layer (`jobs.make_job` / `jobs.run_job`) on a WebUIContext, as the
page and the API send them: the option reaches the processing object as `p.opts` (JobOptions)
or as the field it fills. Each case compares the image (or the noise, the file, the infotext)
with the same job under the default options.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modules import cmd_args, images, processing
from modules.errors import InvalidParameter
from modules.rng import ImageRNG, create_generator
from modules.sd_samplers_common import StepInfo
from webui import jobs

BASE = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "seed": 7, "width": 64, "height": 64,
        "sampler_name": "Euler a"}


@pytest.fixture(scope="module")
def ctx(tiny_model, tmp_path_factory):
    from webui.context import WebUIContext

    root = tmp_path_factory.mktemp("effect")
    return WebUIContext(cmd_args.parse_args(["--precision", "full",
                                             "--ckpt", str(tiny_model.path), "--outdir-samples", str(root / "out"),
                                             "--ui-settings-file", str(root / "config.json")]), tiny_model)


def run(ctx, options: dict | None = None, kind: str = "txt2img", hooks=(), **request):
    """One job through the job layer with `options` set on the server for it (then set back)."""
    options = options or {}
    old = {k: ctx.options[k] for k in options}
    ctx.set_options(options)
    try:
        job = jobs.make_job(kind, {**BASE, **request}, ctx)
        return job, jobs.run_job(ctx, job, hooks=list(hooks))
    finally:
        ctx.set_options(old)


def pixels(processed) -> np.ndarray:
    return np.asarray(processed.images[0]).astype(int)


_baselines: dict = {}


def baseline(ctx, sampler: str):
    if sampler not in _baselines:
        _baselines[sampler] = run(ctx, sampler_name=sampler)[1]
    return _baselines[sampler]


# the processing field an option fills (the others are on p.opts)
FIELDS = {"CLIP_stop_at_last_layers": "clip_skip", "eta_ancestral": "eta", "eta_ddim": "eta"}
# (options, sampler, infotext the job must carry, whether the image must change)
CASES = [
    ({"eta_noise_seed_delta": 31337}, "Euler a", "ENSD: 31337", True),
    ({"eta_noise_seed_delta": 31337}, "Euler", None, False),  # a deterministic sampler draws no later noise
    ({"eta_ancestral": 0.5}, "Euler a", "Eta: 0.5", True),
    ({"eta_ddim": 0.5}, "DDIM", "Eta DDIM: 0.5", True),
    ({"randn_source": "NV"}, "Euler a", "RNG: NV", True),
    ({"randn_source": "GPU"}, "Euler a", None, False),  # GPU on a CPU model is the CPU generator (the default)
    ({"always_discard_next_to_last_sigma": True}, "Euler", "Discard penultimate sigma: True", True),
    ({"CLIP_stop_at_last_layers": 2}, "Euler", "Clip skip: 2", True),
    ({"s_min_uncond": 15.0}, "Euler", "NGMS: 15", True),
]


@pytest.mark.parametrize("options,sampler,infotext,changes", CASES,
                         ids=[f"{next(iter(c[0]))}-{c[1]}" for c in CASES])
def test_option_changes_the_image(ctx, options, sampler, infotext, changes):
    job, processed = run(ctx, options, sampler_name=sampler)
    key, value = next(iter(options.items()))
    assert getattr(job.p.opts, key, None) == value or getattr(job.p, FIELDS.get(key, key)) == value
    diff = np.abs(pixels(processed) - pixels(baseline(ctx, sampler))).mean()
    assert (diff > 0) if changes else (diff == 0), diff
    if infotext:
        assert infotext in processed.infotexts[0]


def test_nv_noise_is_cudas_randn():
    """torch.manual_seed(0); torch.randn(3, 4, device="cuda") on an NVIDIA GPU (the numbers AUTOMATIC1111
    prints in modules/rng_philox.py), here computed on the CPU; a second draw continues the sequence."""
    cuda = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
            [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
            [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
    rng = ImageRNG((3, 4), [0], source="NV")
    first = rng.first()[0]
    assert torch.allclose(first, torch.tensor(cuda), atol=1e-6, rtol=0)
    second = rng.next()[0]
    assert second.shape == (3, 4) and not torch.allclose(first, second)
    assert first.std() > 0.5 and abs(ImageRNG((4, 64, 64), [1], source="NV").first().std() - 1) < 0.02


def test_eta_noise_seed_delta_reseeds_only_the_later_draws():
    shape = (4, 8, 8)
    plain, delta = ImageRNG(shape, [5, 6]), ImageRNG(shape, [5, 6], eta_noise_seed_delta=31337)
    assert torch.equal(plain.first(), delta.first())
    later = delta.next()
    assert not torch.equal(plain.next(), later)
    expected = torch.randn(shape, generator=create_generator(6 + 31337))  # image 1's own generator, seed + ENSD
    assert torch.equal(later[1], expected)


def test_img2img_fix_steps_runs_exactly_steps(ctx):
    counts = {}
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    for fix in (False, True):
        steps = []
        run(ctx, {"img2img_fix_steps": fix}, kind="img2img", hooks=[lambda info, s=steps: s.append(info.step)],
            sampler_name="Euler", init_images=[init], denoising_strength=0.5, steps=4)
        counts[fix] = len(steps)
    assert counts == {False: 3, True: 4}  # A1111: int(0.5 * 4) + 1 steps, or exactly 4 on an 8-step schedule


def test_saving_options_reach_the_file(ctx, tmp_path):
    """samples_format, outdir_txt2img_samples, save_to_dirs and save_images_add_number in one job;
    the infotext travels in the WebP's EXIF UserComment and reads back."""
    folder = tmp_path / "mine"
    options = {"samples_format": "webp", "outdir_txt2img_samples": str(folder), "save_to_dirs": False,
               "save_images_add_number": False, "jpeg_quality": 90}
    job, processed = run(ctx, options, save_images=True, sampler_name="Euler")
    assert [p.name for p in folder.iterdir()] == ["7.webp"]
    with Image.open(folder / "7.webp") as im:
        assert im.format == "WEBP"
        assert images.read_info_from_image(im) == processed.infotexts[0]


@pytest.mark.parametrize("settings,names", [
    (images.SaveSettings(), ["00000-3.png", "00001-3.png"]),
    (images.SaveSettings(samples_format="jpg", save_images_add_number=False), ["3.jpg"]),  # replaced
    (images.SaveSettings(save_images_add_number=False, save_images_replace_action="Add number suffix"),
     ["3.png", "3_0.png"]),
    (images.SaveSettings(samples_format="avif", save_txt=True), ["00000-3.avif", "00000-3.txt", "00001-3.avif",
                                                                  "00001-3.txt"]),
])
def test_save_image_names_and_formats(tmp_path, settings, names):
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    paths = [images.save_image(image, tmp_path, 3, "a cat\nSteps: 3, Seed: 3, Size: 16x16", settings) for _ in range(2)]
    folder = paths[0].parent
    assert (folder.parent == tmp_path) is settings.save_to_dirs
    assert sorted(p.name for p in folder.iterdir()) == names
    with Image.open(paths[-1]) as im:
        assert im.format == {"png": "PNG", "jpg": "JPEG", "avif": "AVIF"}[settings.samples_format]
        assert images.read_info_from_image(im).startswith("a cat\nSteps: 3")


def test_enable_pnginfo_off_writes_no_infotext(tmp_path):
    image = Image.new("RGB", (16, 16))
    for fmt in ("png", "jpg"):
        path = images.save_image(image, tmp_path, 1, "a cat\nSteps: 3, Seed: 1, Size: 16x16",
                                 images.SaveSettings(samples_format=fmt, enable_pnginfo=False, save_to_dirs=False))
        with Image.open(path) as im:
            assert images.read_info_from_image(im) is None


def test_infotext_options_leave_keys_out(tiny_model):
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", steps=3, width=64, height=64)
    full = processing.create_infotext(p, tiny_model, "a", "", 1, 1)
    p.opts = processing.JobOptions(add_model_name_to_info=False, add_model_hash_to_info=False,
                                   add_version_to_infotext=False)
    short = processing.create_infotext(p, tiny_model, "a", "", 1, 1)
    assert "Model: " in full and "Model hash: " in full and "Version: " in full
    assert "Model" not in short and "Version" not in short and "Steps: 3" in short


def test_live_preview_options_choose_step_and_subject():
    from modules.job_state import JobState

    def steps(preview: jobs.LivePreview, n: int = 6):
        state, seen = JobState(), []
        hook = preview.hook(state)
        for i in range(n):
            branches = {"prompt": torch.full((1, 4, 2, 2), 1.0 + i), "negative": torch.full((1, 4, 2, 2), -1.0 - i)}
            if hook:
                hook(StepInfo(i, n, 0.0, torch.zeros(1), torch.zeros(1, 4, 2, 2), branches))
            seen.append(None if state.preview_latents is None else float(state.preview_latents.flatten()[0]))
        return seen, state.preview_method

    assert steps(jobs.LivePreview(show_progress_every_n_steps=2)) == ([None, 2.0, 2.0, 4.0, 4.0, 6.0], "cheap")
    assert steps(jobs.LivePreview(show_progress_every_n_steps=-1, live_preview_content="Negative prompt",
                                  show_progress_type="Full")) == ([None] * 5 + [-6.0], "full")
    assert steps(jobs.LivePreview(show_progress_every_n_steps=1, live_preview_content="Combined"))[0] == [0.0] * 6
    assert steps(jobs.LivePreview(live_previews_enable=False, show_progress_every_n_steps=1))[0] == [None] * 6
    assert jobs.LivePreview.from_options({"show_progress_every_n_steps": 3}).show_progress_every_n_steps == 3


def test_samples_save_decides_the_pages_saving():
    assert jobs.page_request({}, {"samples_save": False})["save_images"] is False
    assert jobs.page_request({}, {"samples_save": True})["save_images"] is True


@pytest.mark.parametrize("override", [{"samples_format": "bmp"}, {"eta_noise_seed_delta": "31337"},
                                      {"randn_source": "TPU"}])
def test_override_settings_of_the_wrong_kind_are_refused(ctx, override):
    with pytest.raises(InvalidParameter) as e:
        jobs.make_job("txt2img", {**BASE, "override_settings": override}, ctx)
    assert e.value.field == next(iter(override)) and next(iter(override)) in str(e.value)


def test_override_settings_reach_the_job(ctx):
    job = jobs.make_job("txt2img", {**BASE, "override_settings": {"eta_noise_seed_delta": 5, "samples_format": "jpg"}},
                        ctx)
    assert job.p.opts.eta_noise_seed_delta == 5 and job.p.opts.saving.samples_format == "jpg"
    assert ctx.options["eta_noise_seed_delta"] == 0  # the server's own stays
