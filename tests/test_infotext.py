"""Infotext in AUTOMATIC1111's format: written into the PNG, parsed back to the same fields."""
from __future__ import annotations

from PIL import Image

from modules import images, processing
from modules.processing import StableDiffusionProcessingTxt2Img


def test_png_infotext_round_trip(tiny_model, tmp_path):
    p = StableDiffusionProcessingTxt2Img(
        prompt="a (red:1.2) circle, on white\nsecond line", negative_prompt="blue, [square:0.5]", steps=5,
        cfg_scale=6.5, seed=4242, width=64, height=48, clip_skip=2, eta=0.5, outpath_samples=str(tmp_path))
    result = processing.process_images(tiny_model, p)
    [path] = result.saved_paths
    assert path.endswith("00000-4242.png")
    text = images.read_info_from_image(Image.open(path))
    assert text == result.infotexts[0]
    fields = images.infotext_to_fields(images.parse_generation_parameters(text))
    assert fields == dict(prompt=p.prompt, negative_prompt=p.negative_prompt, steps=5, sampler_name="DDIM",
                          cfg_scale=6.5, seed=4242, width=64, height=48, clip_skip=2, eta=0.5)
    params = images.parse_generation_parameters(text)
    assert params["Model"] == tiny_model.name and params["Model hash"] == tiny_model.shorthash


def test_negative_line_left_out_when_empty_and_numbering_continues(tiny_model, tmp_path):
    p = StableDiffusionProcessingTxt2Img(prompt="x", steps=2, seed=9, width=64, height=64, batch_size=2,
                                         outpath_samples=str(tmp_path))
    result = processing.process_images(tiny_model, p)
    assert [path.rsplit("/", 1)[1] for path in result.saved_paths] == ["00000-9.png", "00001-10.png"]
    assert "Negative prompt" not in result.infotexts[0]
    assert result.infotexts[0].startswith("x\nSteps: 2, Sampler: DDIM, CFG scale: 7, Seed: 9, Size: 64x64, ")


def test_parses_automatic1111_infotext():
    text = ('masterpiece, (best quality:1.2), 1girl\nNegative prompt: lowres, bad anatomy\n'
            'Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3141592, Size: 512x768, '
            'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, Version: v1.10.1, '
            'Lora hashes: "a: 1234, b: 5678"')
    params = images.parse_generation_parameters(text)
    assert params["Prompt"] == "masterpiece, (best quality:1.2), 1girl"
    assert params["Negative prompt"] == "lowres, bad anatomy"
    assert params["Lora hashes"] == "a: 1234, b: 5678"
    assert images.infotext_to_fields(params) == dict(
        prompt="masterpiece, (best quality:1.2), 1girl", negative_prompt="lowres, bad anatomy", steps=28,
        sampler_name="DPM++ 2M", scheduler="Karras", cfg_scale=7.0, seed=3141592, width=512, height=768, clip_skip=2)


def test_prompt_only_text_is_all_prompt():
    params = images.parse_generation_parameters("just a prompt: with colon, and comma")
    assert params == {"Prompt": "just a prompt: with colon, and comma", "Negative prompt": ""}


def test_values_with_separators_are_quoted():
    assert images.format_parameters({"A": "x, y", "B": 3, "C": None, "D": "a:b"}) == 'A: "x, y", B: 3, D: "a:b"'
