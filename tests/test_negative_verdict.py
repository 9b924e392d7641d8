"""The model's own verdict on whether an image still shows its negative prompt (modules/negative_verdict.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from modules import negative_verdict as V
from modules import sd_models

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "training"))
import shapes as S  # noqa: E402


@pytest.fixture(scope="module")
def shapes_model():
    return sd_models.load_model(REPO / "models" / "Stable-diffusion" / "tiny-shapes", device="cpu")


def drawn(color: str, shape: str = "circle", background: str = "white") -> Image.Image:
    return Image.fromarray(S.render(color, shape, background, 30.0, 17.0, 17.0))


def test_verdict_is_deterministic_and_batch_independent(tiny_model):
    images = [Image.new("RGB", (64, 64), c) for c in ((200, 30, 30), (30, 30, 200), (240, 240, 240))]
    all_at_once = V.score_images(tiny_model, images, ["red", "red", "blue"], 1)
    again = V.score_images(tiny_model, images, ["red", "red", "blue"], 1)
    one_by_one = [V.score_images(tiny_model, [im], [neg], 1)[0] for im, neg in zip(images, ["red", "red", "blue"])]
    reversed_order = V.score_images(tiny_model, images[::-1], ["blue", "red", "red"], 1)[::-1]
    for results in (again, one_by_one, reversed_order):
        assert [r["score"] for r in results] == [r["score"] for r in all_at_once]
        assert [r["probability"] for r in results] == [r["probability"] for r in all_at_once]
    cost = 2 * len(V.DEFAULT_TIMESTEPS) * V.DEFAULT_NOISE_PER_LEVEL
    assert all(r["unet_evaluations"] == cost and r["unet_calls"] == 1 for r in all_at_once)
    other_seed = V.score_images(tiny_model, images[:1], ["red"], 1, seed=5)[0]
    assert other_seed["score"] != all_at_once[0]["score"]  # the fixed seed is what makes it repeatable


def test_empty_negative_has_no_verdict(tiny_model):
    (r,) = V.score_images(tiny_model, [Image.new("RGB", (64, 64))], ["[red::0.5]"], 1)  # empty at the end
    assert r["score"] is None and r["unet_evaluations"] == 0 and r["negative"] == ""


def test_verdict_sees_the_colour_and_the_shape_the_negative_names(shapes_model):
    red, blue, green = drawn("red"), drawn("blue"), drawn("green")
    scores = V.score_images(shapes_model, [red, blue, green, red, blue], ["red", "red", "red", "blue", "blue"], 1)
    s = [r["score"] for r in scores]
    assert s[0] > s[1] and s[0] > s[2]  # a red circle shows `red` more than a blue or a green one
    assert s[4] > s[3]  # and a blue circle `blue` more than a red one
    assert scores[0]["probability"] > scores[1]["probability"]
    circle, square = drawn("purple", "circle", "gray"), drawn("purple", "square", "gray")
    c = V.score_images(shapes_model, [circle, square, circle, square], ["circle", "circle", "square", "square"], 1)
    assert c[0]["score"] > c[1]["score"] and c[3]["score"] > c[2]["score"]


def test_verdict_of_a_generated_image(shapes_model):
    from modules import processing

    p = processing.StableDiffusionProcessingTxt2Img(prompt="a red circle on a white background", steps=10,
                                                    seed=3, width=64, height=64, batch_size=2,
                                                    do_not_save_samples=True)
    red_image = processing.process_images(shapes_model, p).images[0]
    p.prompt = "a green circle on a white background"
    green_image = processing.process_images(shapes_model, p).images[0]
    red, green = V.score_images(shapes_model, [red_image, green_image], ["red", "red"], 1)
    assert red["score"] > green["score"]


def test_roc_auc():
    assert V.roc_auc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert V.roc_auc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert V.roc_auc([1, 1], [True, False]) == 0.5
    assert V.roc_auc([1, 2], [True, True]) is None


def test_final_text_resolves_prompt_editing():
    assert V.final_text("[red:blue:0.5]") == "blue"
    assert V.final_text("red, (circle:1.2)") == "red, (circle:1.2)"
    assert torch.is_tensor(V.fixed_noise((1, 2, 2), 2, 0))
