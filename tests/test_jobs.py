"""The one job layer (webui/jobs.py): the page and the API make the same job from the same settings.

Each control of the txt2img page is changed in turn, its value given as Gradio hands it to
the handler; the job the page builds must equal the job the API builds from the equivalent
JSON. Options that affect jobs (CLIP skip, eta, NGMS) must reach jobs from both doors.
"""
from __future__ import annotations

import pytest

from modules import cmd_args
from modules.errors import InvalidParameter
from webui import jobs

# A non-default value for every control of the page: (value as the page gives it, value in JSON).
CHANGES = {
    "prompt": ("a red circle", "a red circle"),
    "negative_prompt": ("blue [square:0.5]", "blue [square:0.5]"),
    "sampler_name": ("Euler a", "Euler a"),
    "scheduler": ("Karras", "Karras"),
    "steps": (7.0, 7),
    "width": (128.0, 128),
    "height": (96.0, 96),
    "n_iter": (3.0, 3),
    "batch_size": (2.0, 2),
    "cfg_scale": (5.5, 5.5),
    "seed": (1234.0, 1234),
    "guidance": ("Perp-Neg", "Perp-Neg"),
    "negative_weight": (0.5, 0.5),
    "negative_start": (0.2, 0.2),
    "negative_end": (0.9, 0.9),
    "guidance_interval[0]": (0.1, None),
    "guidance_interval[1]": (0.8, None),
    "cfg_rescale": (0.7, 0.7),
    "s_min_uncond": (1.5, 1.5),
    "nag_scale": (3.0, 3.0),
    "nag_tau": (2.0, 2.0),
    "nag_alpha": (0.25, 0.25),
    "nag_start": (0.1, 0.1),
    "nag_end": (0.9, 0.9),
    "negative_report": (True, True),
    "styles": (["Neg"], ["Neg"]),  # the Styles multi-select: names, expanded by the job layer for both doors
}
JSON_NAMES = {"guidance_interval[0]": ("guidance_interval", 0), "guidance_interval[1]": ("guidance_interval", 1)}


@pytest.fixture()
def doors(tiny_model, tmp_path):
    """The context, the page's controls (the real page, built), and the API, on one tiny model."""
    from fastapi import FastAPI

    from webui.api import Api
    from webui.context import WebUIContext
    from webui.ui import create_ui

    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nNeg,"{prompt}, sharp","blurry, lowres"\nbroken,"a,b",c,d\n')
    ctx = WebUIContext(cmd_args.parse_args(["--ckpt", str(tiny_model.path), "--outdir-samples", str(tmp_path / "out"),
                                            "--ui-settings-file", str(tmp_path / "config.json"),
                                            "--styles-file", str(styles)]), tiny_model)
    demo = create_ui(ctx)
    api = Api(FastAPI(), ctx)
    return ctx, demo.sdneg_fields, api


def page_values(controls: dict) -> dict:
    """What the page's generate handler receives with every control at its default."""
    values = {}
    for name, component in controls.items():
        value = component.value
        values[name] = value() if callable(value) else value
    return values


def json_for(changes: dict) -> dict:
    body = {}
    for name, (_, json_value) in changes.items():
        if name in JSON_NAMES:
            base, index = JSON_NAMES[name]
            items = body.setdefault(base, [0.0, 1.0])
            items[index] = changes[name][0]
        else:
            body[name] = json_value
    return body


def page_job(ctx, controls, changes):
    from webui.ui import page_job as make

    values = page_values(controls)
    values.update({name: page_value for name, (page_value, _) in changes.items()})
    return make(ctx, values)


def api_job(ctx, api, changes, defaults: dict):
    body = {**defaults, **json_for(changes), "save_images": bool(ctx.options.get("samples_save", True))}
    return api.job("txt2img", api.Txt2ImgRequest.model_validate(body))


def page_defaults_as_json(controls) -> dict:
    """The page's default settings as a client would send them (the page always sends every control)."""
    values = page_values(controls)
    return jobs.page_request({k: v for k, v in values.items() if not k.startswith("xyz_")}, {})


def test_every_page_control_has_a_change_here(doors):
    _, controls, _ = doors
    job_controls = {n for n in controls if not n.startswith("xyz_") and n != "script_name"}
    assert job_controls == set(CHANGES), "a control was added or removed: give it a value in CHANGES"


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_page_and_api_make_the_same_job_for_each_field(doors, name):
    ctx, controls, api = doors
    changes = {name: CHANGES[name]}
    if name.startswith("guidance_interval"):  # the pair must stay ordered
        changes = {k: CHANGES[k] for k in ("guidance_interval[0]", "guidance_interval[1]")}
    if name == "scheduler":  # the page's default sampler (DDIM) takes only Automatic
        changes["sampler_name"] = CHANGES["sampler_name"]
    defaults = {k: v for k, v in page_defaults_as_json(controls).items() if k not in ("save_images",)}
    page, api_ = page_job(ctx, controls, changes), api_job(ctx, api, changes, defaults)
    assert page.p == api_.p
    assert (page.script, page.checkpoint, page.kind) == (api_.script, api_.checkpoint, api_.kind)


def test_page_and_api_make_the_same_job_with_everything_changed(doors):
    ctx, controls, api = doors
    defaults = page_defaults_as_json(controls)
    page, api_ = page_job(ctx, controls, CHANGES), api_job(ctx, api, CHANGES, defaults)
    assert page.p == api_.p
    assert page.p.guidance_interval == (0.1, 0.8) and page.p.steps == 7 and isinstance(page.p.steps, int)


@pytest.mark.parametrize("option, value, field", [
    ("CLIP_stop_at_last_layers", 2, "clip_skip"),
    ("eta_ddim", 0.5, "eta"),
    ("s_min_uncond", 2.0, "s_min_uncond"),
])
def test_options_reach_page_and_api_jobs_alike(doors, option, value, field):
    from webui.ui import create_ui

    ctx, _, api = doors
    ctx.options.set({option: value})
    controls = create_ui(ctx).sdneg_fields  # a page loaded after the option was set
    defaults = page_defaults_as_json(controls)
    defaults.pop(field, None)
    changes = {"sampler_name": ("DDIM", "DDIM")}
    page_values_ = page_values(controls)
    page_values_["sampler_name"] = "DDIM"
    # a page control for the field starts at the option's value (it would win over the option, as a JSON field does)
    from webui.ui import page_job as make

    page = make(ctx, page_values_)
    api_ = api_job(ctx, api, changes, defaults)
    assert getattr(page.p, field) == getattr(api_.p, field) == value


def test_styles_reach_page_and_api_jobs_alike_with_their_warnings(doors):
    """The page's Styles multi-select and the API's `styles` are expanded by the one job layer: the same
    prompts, the prompts as sent kept for Compare's "Without styles", the same warnings (an unknown style,
    the styles file's unreadable line) that end up in the result's comments (the API's `info`)."""
    ctx, controls, api = doors
    changes = {"prompt": ("a red circle", "a red circle"), "negative_prompt": ("blue", "blue"),
               "styles": (["Neg", "Missing"], ["Neg", "Missing"])}
    defaults = {k: v for k, v in page_defaults_as_json(controls).items() if k != "save_images"}
    page, api_ = page_job(ctx, controls, changes), api_job(ctx, api, changes, defaults)
    assert page.p == api_.p and page.unstyled == api_.unstyled == ("a red circle", "blue")
    assert (page.p.prompt, page.p.negative_prompt) == ("a red circle, sharp", "blue, blurry, lowres")
    assert page.warnings == api_.warnings
    assert "Style not found: Missing" in page.warnings
    assert any("line 3" in w and "more columns" in w for w in page.warnings), page.warnings
    plain = page_job(ctx, controls, {"styles": ([], [])})
    assert plain.unstyled is None and plain.warnings == []


def test_page_job_refuses_what_the_api_refuses(doors):
    ctx, controls, api = doors
    from webui.ui import page_job as make

    values = page_values(controls)
    with pytest.raises(InvalidParameter, match="steps must be a whole number"):
        make(ctx, {**values, "steps": 2.5})
    with pytest.raises(InvalidParameter, match="width is empty"):
        make(ctx, {**values, "width": None})
    with pytest.raises(InvalidParameter) as e:
        make(ctx, {**values, "width": 100.0})
    assert e.value.field == "width"


def test_strict_types():
    with pytest.raises(InvalidParameter, match="steps must be a whole number"):
        jobs.coerce("steps", True, int)
    with pytest.raises(InvalidParameter, match="cfg_scale must be a finite number"):
        jobs.coerce("cfg_scale", float("inf"), float)
    with pytest.raises(InvalidParameter, match="prompt must be text"):
        jobs.coerce("prompt", 5, str)
    assert jobs.coerce("steps", 20.0, int) == 20 and isinstance(jobs.coerce("steps", 20.0, int), int)
    assert jobs.coerce("guidance_interval", [0, 1], tuple[float, float]) == (0.0, 1.0)
