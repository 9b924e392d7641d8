"""Step previews: the cheap latent->RGB projection (values) and the per-job preview collector."""
from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from modules import processing, sd_vae_approx
from modules.sd_models import SD1_LATENT_RGB
from webui import previews

F = torch.tensor(SD1_LATENT_RGB)


def test_cheap_approximation_is_the_linear_map_per_pixel():
    latents = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)) * 0.5
    rgb = sd_vae_approx.cheap_approximation(latents, SD1_LATENT_RGB)
    assert rgb.shape == (2, 3, 3, 5) and rgb.dtype == torch.float32
    expected = torch.einsum("lr,nlxy->nrxy", F, latents).clamp(-1, 1)  # AUTOMATIC1111's formula
    torch.testing.assert_close(rgb, expected)
    # one latent pixel by hand: rgb[c] = sum_l latent[l] * F[l][c]
    pixel = latents[1, :, 2, 4]
    by_hand = [sum(float(pixel[l]) * SD1_LATENT_RGB[l][c] for l in range(4)) for c in range(3)]
    assert rgb[1, :, 2, 4].tolist() == pytest.approx([max(-1, min(1, v)) for v in by_hand], abs=1e-6)


def test_cheap_approximation_unit_latents_give_the_factor_rows_plus_bias():
    latents = torch.eye(4).view(4, 4, 1, 1)  # image i: 1 in channel i
    bias = [0.1, -0.2, 0.05]
    rgb = sd_vae_approx.cheap_approximation(latents, SD1_LATENT_RGB, bias)
    for i in range(4):
        assert rgb[i, :, 0, 0].tolist() == pytest.approx([SD1_LATENT_RGB[i][c] + bias[c] for c in range(3)], abs=1e-6)


def test_cheap_approximation_clamps_and_checks_channels():
    big = torch.full((1, 4, 2, 2), 100.0)
    rgb = sd_vae_approx.cheap_approximation(big, SD1_LATENT_RGB)
    assert rgb.min() >= -1 and rgb.max() <= 1
    assert rgb[0, 0, 0, 0] == 1  # 100 * (0.298 + 0.187 - 0.158 - 0.184) > 1
    with pytest.raises(ValueError):
        sd_vae_approx.cheap_approximation(torch.zeros(1, 16, 2, 2), SD1_LATENT_RGB)


def test_to_pil_maps_minus_one_to_black_and_one_to_white():
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    (im,) = sd_vae_approx.to_pil(images)
    assert im.mode == "RGB" and im.size == (3, 1)
    assert [im.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    (big,) = sd_vae_approx.to_pil(images, size=(12, 4))
    assert big.size == (12, 4)


def test_tile_size_keeps_aspect_and_caps_the_long_side():
    assert previews.tile_size(64, 64) == (64, 64)
    assert previews.tile_size(1024, 512) == (256, 128)


def run(model, hooks, **kw):
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt="a red circle", negative_prompt="blue", steps=4, cfg_scale=7, seed=1, width=64, height=64,
        do_not_save_samples=True, **kw)
    return processing.process_images(model, p, hooks=hooks)


def test_collector_gains_one_frame_per_step_with_step_captions(tiny_model):
    collector = previews.PreviewCollector(tiny_model, size=(64, 64))
    run(tiny_model, [collector])
    frames = collector.frames()
    assert [f.caption for f in frames] == ["Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"]
    assert all(f.image.size == (64, 64) for f in frames)


def test_collector_shows_the_pred_x0_of_each_subject(tiny_model):
    """Combined, Prompt and Negative are the cheap projections of pred_x0, branches["prompt"] and
    branches["negative"] of the same step; All three puts them side by side."""
    seen = []
    collectors = {s: previews.PreviewCollector(tiny_model, s, size=(64, 64)) for s in previews.SUBJECTS}
    run(tiny_model, [seen.append, *collectors.values()])
    last = seen[-1]
    factors, bias = tiny_model.latent_rgb

    def expected(latent):
        return sd_vae_approx.to_pil(sd_vae_approx.cheap_approximation(latent, factors, bias), (64, 64))[0]

    combined, prompt, negative = (collectors[s].frames()[-1].image for s in previews.SUBJECTS[:3])
    assert combined.tobytes() == expected(last.pred_x0).tobytes()
    assert prompt.tobytes() == expected(last.branches["prompt"]).tobytes()
    assert negative.tobytes() == expected(last.branches["negative"]).tobytes()
    assert prompt.tobytes() != negative.tobytes()
    both = collectors[previews.SUBJECT_ALL].frames()[-1].image
    assert both.size == (192, 64)
    assert both.crop((128, 0, 192, 64)).tobytes() == negative.tobytes()
    assert both.crop((0, 0, 64, 64)).tobytes() == combined.tobytes()


def test_approx_cheap_uses_the_models_preview_decoder(tiny_model):
    """A model with its own preview decoder (the embedded model ships one) previews through it, at image
    resolution; without one, the linear map (the test above)."""
    import copy

    torch.manual_seed(0)
    model = copy.copy(tiny_model)
    model.__dict__["preview_decoder"] = sd_vae_approx.PreviewDecoder(channels=8, depth=1, upscale=8).eval()
    assert sd_vae_approx.cheap_kind(model) == "decoder" and sd_vae_approx.cheap_kind(tiny_model) == "linear"
    seen = []
    collector = previews.PreviewCollector(model, size=(64, 64))
    run(model, [seen.append, collector])
    with torch.no_grad():
        rgb = model.preview_decoder(seen[-1].pred_x0.float()).clamp(-1, 1)
    expected = sd_vae_approx.to_pil(rgb)[0]
    assert expected.size == (64, 64)
    got = collector.frames()[-1].image
    diff = [abs(a - b) for a, b in zip(got.tobytes(), expected.tobytes())]
    assert max(diff) <= 1  # the collector may keep latents in float16
    linear = sd_vae_approx.to_pil(sd_vae_approx.cheap_approximation(seen[-1].pred_x0, *tiny_model.latent_rgb),
                                  (64, 64))[0]
    assert got.tobytes() != linear.tobytes()


def test_collector_batches_grid_and_batch_count_captions(tiny_model):
    collector = previews.PreviewCollector(tiny_model, previews.SUBJECT_ALL, size=(64, 64), batch_count=2)
    run(tiny_model, [collector], batch_size=3, n_iter=2)
    frames = collector.frames()
    assert len(frames) == 8
    assert frames[4].caption == "Step 1/4 · batch 2/2"
    assert frames[0].image.size == (3 * 64, 3 * 64)  # one row per image, three subjects
    single = previews.PreviewCollector(tiny_model, size=(64, 64))
    run(tiny_model, [single], batch_size=4)
    assert single.frames()[0].image.size == (128, 128)  # 2x2 grid


def test_negative_preview_is_gray_without_a_negative_pass(tiny_model):
    collector = previews.PreviewCollector(tiny_model, previews.SUBJECT_NEGATIVE, size=(64, 64))
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a", steps=2, cfg_scale=1, seed=1, width=64, height=64,
                                                    do_not_save_samples=True)
    processing.process_images(tiny_model, p, hooks=[collector])
    assert collector.frames()[0].image.getcolors() == [(64 * 64, (128, 128, 128))]


def test_full_method_is_the_vae_decode_of_pred_x0(tiny_model):
    seen = []
    collector = previews.PreviewCollector(tiny_model, method=previews.METHOD_FULL, size=(64, 64))
    run(tiny_model, [seen.append, collector])
    expected = sd_vae_approx.to_pil(tiny_model.decode_first_stage(seen[-1].pred_x0))[0]
    assert collector.frames()[-1].image.tobytes() == expected.tobytes()


def test_previews_cost_the_sampling_thread_almost_nothing(tiny_model):
    """The hook only copies latents; the pictures are made by whoever reads frames() (the UI thread)."""
    for method in previews.METHODS:
        collector = previews.PreviewCollector(tiny_model, previews.SUBJECT_ALL, method, size=(64, 64))
        start = time.perf_counter()
        run(tiny_model, [collector], batch_size=4)
        total = time.perf_counter() - start
        assert collector.render_seconds == 0  # nothing rendered while sampling
        assert collector.seconds < 0.02 * total, (collector.seconds, total)
        assert len(collector.frames()) == 4 and collector.render_seconds > 0


def test_animation_has_one_frame_per_step(tiny_model, tmp_path):
    collector = previews.PreviewCollector(tiny_model, size=(64, 64))
    run(tiny_model, [collector])
    path = previews.save_animation(collector.frames(), tmp_path / "t.gif")
    with Image.open(path) as im:
        assert im.format == "GIF" and im.is_animated
        durations = []
        for i in range(im.n_frames):  # identical neighbours are merged, their times added
            im.seek(i)
            durations.append(im.info["duration"])
    assert sum(durations) == 3 * 120 + 1500
    assert previews.save_animation([], tmp_path / "none.gif") is None


def test_unknown_subject_or_method_is_refused(tiny_model):
    with pytest.raises(ValueError):
        previews.PreviewCollector(tiny_model, "Both")
    with pytest.raises(ValueError):
        previews.PreviewCollector(tiny_model, method="Blurry")
