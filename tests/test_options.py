"""AUTOMATIC1111's settings (modules/options.py): its keys and defaults, checked writes, config.json.

Pure Python: no model, no server. The API routes and the Settings tab on top of it are tested
with the server.
"""
from __future__ import annotations

import json
import os

import pytest

from modules import options as options_mod
from modules.errors import InvalidParameter
from modules.options import OPTIONS, TAKES_EFFECT, Options

# One key of each kind (and with fixed choices), with a value other than A1111's default.
TEN = {
    "samples_format": "webp",  # str with fixed choices
    "CLIP_stop_at_last_layers": 2,  # int
    "eta_ddim": 0.25,  # float
    "send_seed": False,  # bool
    "quicksettings_list": ["sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers"],  # list of text
    "canvas_disabled_functions": ["Zoom", "Overlap"],  # list with fixed choices
    "upscaler_for_img2img": "ESRGAN_4x",  # text or null
    "img_downscale_threshold": 2,  # number: an int stays an int
    "sdxl_refiner_high_aesthetic_score": 7.5,  # number
    "outdir_samples": "/tmp/outputs",  # text
    "randn_source": "NV",
    "eta_noise_seed_delta": 31337,
}


def dumps(d: dict) -> str:
    return json.dumps(d, ensure_ascii=False)


def test_keys_and_defaults_are_automatic1111s():
    opts = Options().get_all()
    assert len(opts) >= 300  # A1111 1.10 with its built-in extensions serves ~320
    expected = {
        "send_seed": True, "samples_save": True, "samples_format": "png", "CLIP_stop_at_last_layers": 1,
        "eta_noise_seed_delta": 0, "sd_vae": "Automatic", "img2img_fix_steps": False, "eta_ddim": 0.0,
        "eta_ancestral": 1.0, "s_min_uncond": 0.0, "randn_source": "CPU", "show_progress_every_n_steps": 10,
        "live_preview_content": "Prompt", "live_previews_enable": True, "show_progress_type": "Approx NN",
        "sd_model_checkpoint": None, "sd_checkpoint_hash": "", "sd_checkpoints_limit": 1, "sd_checkpoint_cache": 0,
        "quicksettings_list": ["sd_model_checkpoint"], "outdir_txt2img_samples": "outputs/txt2img-images",
        "outdir_img2img_grids": "outputs/img2img-grids", "save_images_add_number": True,
        "always_discard_next_to_last_sigma": False, "sdxl_crop_top": 0, "sdxl_crop_left": 0,
        "sdxl_refiner_low_aesthetic_score": 2.5, "sdxl_refiner_high_aesthetic_score": 6.0,
        "sd_vae_overrides_per_model_preferences": True, "emphasis": "Original", "jpeg_quality": 80,
        "directories_filename_pattern": "[date]", "keyedit_delimiters": ".,\\/!?%^*;:{}=`~() ",
        "sd_lora": "None", "lora_functional": False, "ldsr_steps": 100, "SWIN_tile": 192, "hypertile_max_tile_vae": 128,
        "canvas_hotkey_zoom": "Alt", "extra_options_cols": 1, "sd_noise_schedule": "Default", "uni_pc_order": 3,
    }
    assert {k: opts[k] for k in expected} == expected
    for k, v in expected.items():  # an int default stays an int in the JSON, a float a float
        assert type(opts[k]) is type(v), k
    # the explanatory html blocks are never stored nor served (A1111's OptionHTML: do_not_save)
    assert not {"sd_vae_explanation", "infotext_explanation", "profiling_explanation"} & set(opts)
    json.dumps(opts, allow_nan=False)


def test_ten_keys_written_read_saved_and_loaded(tmp_path):
    opts = Options()
    assert sorted(opts.set(TEN, is_api=True)) == sorted(TEN)
    assert {k: opts[k] for k in TEN} == TEN
    assert opts.get_all()["eta_ddim"] == 0.25
    path = tmp_path / "config.json"
    opts.save(path)
    assert json.loads(path.read_text(encoding="utf8"))["samples_format"] == "webp"
    fresh = Options.from_file(path)
    assert fresh.load_error is None and fresh.load_warnings == []
    assert {k: fresh[k] for k in TEN} == TEN
    assert dumps(fresh.get_all()) == dumps(opts.get_all())
    assert type(fresh["img_downscale_threshold"]) is int and type(fresh["sdxl_refiner_high_aesthetic_score"]) is float


@pytest.mark.parametrize("key, value, words", [
    ("CLIP_stop_at_last_layers", "two", "whole number"),
    ("CLIP_stop_at_last_layers", 2.5, "whole number"),
    ("CLIP_stop_at_last_layers", True, "whole number"),
    ("CLIP_stop_at_last_layers", 0, "between 1 and 12"),
    ("CLIP_stop_at_last_layers", 13, "between 1 and 12"),
    ("samples_save", "yes", "true or false"),
    ("samples_save", 1, "true or false"),
    ("samples_format", "bmp", "one of 'png', 'jpg'"),
    ("randn_source", "cuda", "one of 'GPU', 'CPU', 'NV'"),
    ("eta_ddim", "0.1", "a number"),
    ("eta_ddim", 1.5, "between 0 and 1"),
    ("eta_ddim", float("nan"), "a number"),
    ("quicksettings_list", "sd_vae", "a list of text"),
    ("quicksettings_list", [1], "a list of text"),
    ("lora_hide_unknown_for_versions", ["SD3"], "a list of 'SD1', 'SD2', 'SDXL'"),
    ("sd_model_checkpoint", 5, "text or null"),
    ("show_progress_every_n_steps", -2, "between -1 and 32"),
    ("sdxl_crop_top", -8, "at least 0"),
    ("outdir_samples", None, "text"),
])
def test_a_wrong_value_names_the_key_and_changes_nothing(key, value, words):
    opts = Options()
    opts.set({"send_seed": False})
    before = dumps(opts.get_all())
    with pytest.raises(InvalidParameter) as e:
        opts.set({"samples_save": False, "eta_ancestral": 0.5, key: value, "send_size": False}, is_api=True)
    assert e.value.field == key
    assert key in str(e.value) and words in str(e.value), str(e.value)
    assert dumps(opts.get_all()) == before  # all or nothing


def test_values_are_normalised_as_the_engine_needs_them():
    opts = Options()
    opts.set({"CLIP_stop_at_last_layers": 3.0, "eta_ancestral": 0, "target_side_length": 4000.0})
    assert opts["CLIP_stop_at_last_layers"] == 3 and type(opts["CLIP_stop_at_last_layers"]) is int  # A1111's UI sends 3.0
    assert opts["eta_ancestral"] == 0.0 and type(opts["eta_ancestral"]) is float
    assert type(opts["target_side_length"]) is float  # a "number" keeps what it was given
    # options only checks ranges where the engine acts on the value; others are stored as A1111 stores them
    opts.set({"ESRGAN_tile": 4096})
    assert opts["ESRGAN_tile"] == 4096
    assert opts.set({"ESRGAN_tile": 4096, "send_seed": True}) == []  # equal values change nothing
    with pytest.raises(InvalidParameter):  # 1 == True in Python, but it is not a JSON boolean
        opts.set({"send_seed": 1})


def test_get_post_get_is_stable_byte_for_byte(tmp_path):
    opts = Options()
    opts.set({**TEN, "my_extension_setting": {"nested": [1, 2.5, "x", None]}, "another_extension": 7})
    opts.record("sd_model_checkpoint", "tiny [0123456789]")
    opts.record("sd_checkpoint_hash", "0123456789" * 6 + "abcd")
    first = dumps(opts.get_all())
    assert opts.set(json.loads(first), is_api=True) == []
    second = dumps(opts.get_all())
    assert second == first
    # and through config.json
    opts.save(tmp_path / "config.json")
    again = Options.from_file(tmp_path / "config.json")
    assert dumps(again.get_all()) == first
    assert again.set(json.loads(first), is_api=True) == []
    assert dumps(again.get_all()) == first
    # a fresh server's own defaults round-trip too
    fresh = Options()
    assert fresh.set(json.loads(dumps(fresh.get_all())), is_api=True) == []


def test_unknown_keys_are_stored_and_returned(tmp_path):
    opts = Options()
    opts.set({"unknown_option": 1, "tac_tagFile": "danbooru.csv"}, is_api=True)
    got = opts.get_all()
    assert got["unknown_option"] == 1 and got["tac_tagFile"] == "danbooru.csv"
    assert list(got)[-2:] == ["unknown_option", "tac_tagFile"]  # after the table's keys
    opts.save(tmp_path / "c.json")
    assert Options.from_file(tmp_path / "c.json")["tac_tagFile"] == "danbooru.csv"
    with pytest.raises(InvalidParameter) as e:
        opts.set({"weird": object()})
    assert e.value.field == "weird"
    with pytest.raises(InvalidParameter):
        opts.set({"nan_value": float("inf")})
    with pytest.raises(InvalidParameter):
        opts.set(["not", "a", "dict"])


def test_read_only_html_and_api_restricted_keys():
    opts = Options()
    assert opts.set({"sd_checkpoint_hash": "forged", "sd_vae_explanation": "<b>x</b>"}, is_api=True) == []
    assert opts["sd_checkpoint_hash"] == "" and "sd_vae_explanation" not in opts.get_all()
    opts.record("sd_checkpoint_hash", "abc")  # the engine records the loaded checkpoint's hash
    assert opts.get_all()["sd_checkpoint_hash"] == "abc"
    # A1111's restrict_api settings cannot be changed through the API, only from the page
    assert opts.set({"api_useragent": "curl"}, is_api=True) == []
    assert opts["api_useragent"] == ""
    assert opts.set({"api_useragent": "curl"}) == ["api_useragent"]


def test_mapping_interface_and_server_defaults():
    opts = Options(defaults={"outdir_txt2img_samples": "/data/out"})
    assert opts["outdir_txt2img_samples"] == "/data/out" and opts.default("outdir_txt2img_samples") == "/data/out"
    merged = {**opts, "CLIP_stop_at_last_layers": 2}
    assert merged["CLIP_stop_at_last_layers"] == 2 and merged["samples_format"] == "png"
    assert opts.get("no_such_key", "fallback") == "fallback" and len(opts) == len(opts.get_all())
    got = opts["quicksettings_list"]
    got.append("x")  # a copy: the stored value does not change behind the options' back
    assert opts["quicksettings_list"] == ["sd_model_checkpoint"]
    with pytest.raises(KeyError):
        Options(defaults={"no_such_option": 1})
    with pytest.raises(InvalidParameter):
        Options(defaults={"CLIP_stop_at_last_layers": 99})


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2, 3]", b"\xff\xfe\x00 not utf-8", b"", b'{"a": 1'])
def test_a_corrupt_config_is_reported_and_the_defaults_used(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    opts = Options()
    reason = opts.load(path)
    assert reason and opts.load_error == reason and "config.json" in reason and "default" in reason
    assert dumps(opts.get_all()) == dumps(Options().get_all())
    assert (tmp_path / "config.json.corrupt").read_bytes() == content
    assert not path.exists()  # moved aside, so the next save does not destroy it
    opts.set({"send_seed": False})
    opts.save(path)
    assert Options.from_file(path)["send_seed"] is False


def test_bad_values_in_a_valid_config_fall_back_per_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"CLIP_stop_at_last_layers": "two", "samples_format": "jpg", "eta_ddim": 7,
                                "sd_vae_explanation": "ignored", "my_ext": [1]}))
    opts = Options.from_file(path)
    assert opts.load_error is None
    assert len(opts.load_warnings) == 2 and "CLIP_stop_at_last_layers" in opts.load_warnings[0]
    assert opts["CLIP_stop_at_last_layers"] == 1 and opts["eta_ddim"] == 0.0  # defaults
    assert opts["samples_format"] == "jpg" and opts["my_ext"] == [1]
    assert "sd_vae_explanation" not in opts.get_all()
    missing = Options()
    assert missing.load(tmp_path / "nope.json") is None and missing.load_error is None


def test_old_keys_are_migrated_as_automatic1111_does(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"sd_vae_as_default": True, "quicksettings": "sd_model_checkpoint, sd_vae"}))
    opts = Options.from_file(path)
    assert opts["sd_vae_overrides_per_model_preferences"] is False
    assert opts["quicksettings_list"] == ["sd_model_checkpoint", "sd_vae"]
    assert opts["sd_vae_as_default"] is True  # kept, as A1111 keeps it


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    opts = Options()
    opts.save(path)
    good = path.read_text(encoding="utf8")
    assert json.loads(good)["samples_format"] == "png"
    assert sorted(os.listdir(tmp_path)) == ["config.json"]
    opts.set({"samples_format": "jpg"})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(options_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        opts.save(path)
    assert path.read_text(encoding="utf8") == good  # the old file is untouched
    assert sorted(os.listdir(tmp_path)) == ["config.json"]  # and no temp file is left behind
    monkeypatch.undo()
    opts.save(tmp_path / "sub" / "config.json")  # the folder is made
    assert json.loads((tmp_path / "sub" / "config.json").read_text())["samples_format"] == "jpg"


def test_sections_group_as_automatic1111():
    sections = options_mod.sections()
    shown = [o["key"] for s in sections for o in s["options"]]
    assert sorted(shown) == sorted(TAKES_EFFECT) and len(shown) == len(set(shown))
    assert "sd_checkpoint_hash" not in shown
    categories = [s["category"] for s in sections]
    order = list(options_mod.CATEGORIES.values())
    assert categories == sorted(categories, key=order.index)  # by category, in A1111's order
    for category in set(categories):  # sections of a category sorted by label, as A1111's reorder()
        labels = [s["label"] for s in sections if s["category"] == category]
        assert labels == sorted(labels)
    by_label = {s["label"]: s for s in sections}
    vae = {o["key"]: o for o in by_label["VAE"]["options"]}
    assert vae["sd_vae"]["choices_from"] == "vaes" and vae["sd_vae"]["default"] == "Automatic"
    clip = {o["key"]: o for o in by_label["Stable Diffusion"]["options"]}["CLIP_stop_at_last_layers"]
    assert (clip["label"], clip["kind"], clip["minimum"], clip["maximum"]) == ("Clip skip", "int", 1, 12)
    everything = options_mod.sections(only_effective=False)
    assert sum(len(s["options"]) for s in everything) > 250
    assert "Hidden options" not in {s["label"] for s in everything}
    for key in TAKES_EFFECT:
        assert OPTIONS[key].takes_effect
