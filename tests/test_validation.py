"""Bad input gets a clear UserError and changes nothing."""
from __future__ import annotations

import pytest

from modules import processing, sd_models
from modules.errors import InvalidParameter, ModelLoadError, ModelNotFound, SamplerNotFound, UserError
from modules.processing import StableDiffusionProcessingTxt2Img


@pytest.mark.parametrize("field,value,message", [
    ("steps", 0, "steps must be between 1 and 150"),
    ("steps", 151, "steps must be between 1 and 150"),
    ("steps", 2.5, "steps must be a whole number"),
    ("cfg_scale", 0.5, "cfg_scale must be between 1.0 and 30.0"),
    ("cfg_scale", 31, "cfg_scale must be between 1.0 and 30.0"),
    ("width", 65, "width must be a multiple of 8"),
    ("height", 0, "height must be between 8 and 2048"),
    ("width", -64, "width must be between 8 and 2048"),
    ("batch_size", 9, "batch_size must be between 1 and 8"),
    ("batch_size", 0, "batch_size must be between 1 and 8"),
    ("eta", 1.5, "eta must be between 0.0 and 1.0"),
    ("seed", "abc", "seed must be a whole number"),
])
def test_bad_values_are_rejected_before_anything_is_written(tiny_model, tmp_path, field, value, message):
    p = StableDiffusionProcessingTxt2Img(prompt="x", steps=2, width=64, height=64, outpath_samples=str(tmp_path / "out"))
    setattr(p, field, value)
    with pytest.raises(InvalidParameter, match=message) as err:
        processing.process_images(tiny_model, p)
    assert err.value.field == field and isinstance(err.value, UserError) and err.value.status_code == 422
    assert not (tmp_path / "out").exists()


def test_unknown_sampler(tiny_model, tmp_path):
    p = StableDiffusionProcessingTxt2Img(prompt="x", steps=2, width=64, height=64, sampler_name="Nope",
                                         outpath_samples=str(tmp_path / "out"))
    with pytest.raises(SamplerNotFound, match="Sampler not found: 'Nope'") as err:
        processing.process_images(tiny_model, p)
    assert err.value.status_code == 404 and not (tmp_path / "out").exists()


def test_sampler_names_are_case_insensitive(tiny_model):
    p = StableDiffusionProcessingTxt2Img(prompt="x", steps=2, width=64, height=64, sampler_name="ddim",
                                         do_not_save_samples=True)
    assert processing.process_images(tiny_model, p).infotexts[0].count("Sampler: DDIM") == 1


def test_malformed_prompt_syntax_is_used_literally(tiny_model):
    for prompt in ["a [unbalanced", "((((", "[a:b:c:d]", "a:1.5 AND", "\\", "[|]", "(x:)"]:
        p = StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=prompt, steps=2, width=64, height=64,
                                             do_not_save_samples=True)
        result = processing.process_images(tiny_model, p)
        assert result.images[0].size == (64, 64) and result.infotexts[0].startswith(prompt)


def test_missing_and_broken_models(tmp_path):
    with pytest.raises(ModelNotFound):
        sd_models.load_model(tmp_path / "nothing-here")
    broken = tmp_path / "broken"
    (broken / "unet").mkdir(parents=True)
    (broken / "model_index.json").write_text("{}")
    (broken / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="Could not load broken"):
        sd_models.load_model(broken)
