"""The one job layer (webui/jobs.py): the page and the API make the same job from the same settings.

Each control of the txt2img page is changed in turn, its value given as Gradio hands it to
the handler; the job the page builds must equal the job the API builds from the equivalent
JSON. Options that affect jobs (CLIP skip, eta, NGMS) must reach jobs from both doors.
"""
from __future__ import annotations

import pytest

from modules import cmd_args, sd_guidance
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
    # the guidance rules' own fields (shown with their rule, webui/ui_guidance.py)
    "dng_scale": (8.0, 8.0),
    "dng_prior": (0.05, 0.05),
    "dng_temperature": (0.5, 0.5),
    "dng_offset": (0.001, 0.001),
    "dng_p_min": (1e-5, 1e-5),
    "dng_p_max": (0.9, 0.9),
    "nag_follows_dng": (True, True),
    "apg_eta": (0.5, 0.5),
    "apg_norm_threshold": (10.0, 10.0),
    "apg_momentum": (-0.25, -0.25),
    "dynthres_mimic_scale": (5.0, 5.0),
    "dynthres_threshold_percentile": (0.95, 0.95),
    "dynthres_mimic_mode": ("Linear Down", "Linear Down"),
    "dynthres_mimic_scale_min": (1.0, 1.0),
    "dynthres_cfg_mode": ("Cosine Up", "Cosine Up"),
    "dynthres_cfg_scale_min": (2.0, 2.0),
    "dynthres_sched_val": (4.0, 4.0),
    # the hires fix accordion (each tested with the hires fix on)
    "enable_hr": (True, True),
    "hr_upscaler": ("Latent (nearest)", "Latent (nearest)"),
    "hr_second_pass_steps": (3.0, 3),
    "denoising_strength": (0.4, 0.4),
    "hr_scale": (1.5, 1.5),
    "hr_resize_x": (96.0, 96),
    "hr_resize_y": (128.0, 128),
    "hr_sampler_name": ("Euler", "Euler"),
    "hr_scheduler": ("Karras", "Karras"),
    "hr_cfg": (5.0, 5.0),
    "hr_prompt": ("a blue circle", "a blue circle"),
    "hr_negative_prompt": ("green", "green"),
    "styles": (["Neg"], ["Neg"]),  # the Styles multi-select: names, expanded by the job layer for both doors
}
HIRES = {"hr_upscaler", "hr_second_pass_steps", "denoising_strength", "hr_scale", "hr_resize_x", "hr_resize_y",
         "hr_sampler_name", "hr_scheduler", "hr_cfg", "hr_prompt", "hr_negative_prompt"}
# The img2img tab: the same controls (but the hires fix's) and its own, radios by label (the API: their index).
IMG2IMG_CHANGES = {
    **{k: v for k, v in CHANGES.items() if k not in HIRES | {"enable_hr"}},
    "resize_mode": ("Crop and resize", 1),
    "denoising_strength": (0.4, 0.4),
    "mask_blur": (8.0, 8),
    "inpainting_mask_invert": ("Inpaint not masked", 1),
    "inpainting_fill": ("latent noise", 2),
    "inpaint_full_res": ("Only masked", True),
    "inpaint_full_res_padding": (16.0, 16),
}
IMAGE_INPUTS = {"img2img_mode", "init_img", "init_img_with_mask", "init_img_inpaint", "init_mask_inpaint"}
JSON_NAMES = {"guidance_interval[0]": ("guidance_interval", 0), "guidance_interval[1]": ("guidance_interval", 1)}


@pytest.fixture()
def doors(page_and_api):
    """The context, the txt2img page's controls (the real page, built), and the API, on one tiny model."""
    ctx, demo, api = page_and_api
    return ctx, demo.sdneg_fields, api


@pytest.fixture(scope="module")
def page_and_api(tiny_model, tmp_path_factory):
    """Built once for the module (building the page takes a second or two); tests leave its options alone."""
    return build_page_and_api(tiny_model, tmp_path_factory.mktemp("jobs"))


@pytest.fixture()
def fresh_doors(tiny_model, tmp_path):
    """As `doors`, with a context of its own (for tests that change the options)."""
    ctx, demo, api = build_page_and_api(tiny_model, tmp_path)
    return ctx, demo.sdneg_fields, api


def build_page_and_api(tiny_model, tmp_path):
    from fastapi import FastAPI

    from webui.api import Api
    from webui.context import WebUIContext
    from webui.ui import create_ui

    styles = tmp_path / "styles.csv"
    styles.write_text('name,prompt,negative_prompt\nNeg,"{prompt}, sharp","blurry, lowres"\nbroken,"a,b",c,d\n')
    ctx = WebUIContext(cmd_args.parse_args(["--precision", "full",
                                            "--ckpt", str(tiny_model.path), "--outdir-samples", str(tmp_path / "out"),
                                            "--ui-settings-file", str(tmp_path / "config.json"),
                                            "--styles-file", str(styles)]), tiny_model)
    demo = create_ui(ctx)
    api = Api(FastAPI(), ctx)
    return ctx, demo, api


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


def test_every_img2img_control_has_a_change_here(img2img_doors):
    _, controls, _, _ = img2img_doors
    job_controls = {n for n in controls if not n.startswith("xyz_") and n != "script_name"}
    assert job_controls == set(IMG2IMG_CHANGES) | IMAGE_INPUTS, "give the new img2img control a value here"


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_page_and_api_make_the_same_job_for_each_field(doors, name):
    ctx, controls, api = doors
    changes = {name: CHANGES[name]}
    if name.startswith("guidance_interval"):  # the pair must stay ordered
        changes = {k: CHANGES[k] for k in ("guidance_interval[0]", "guidance_interval[1]")}
    if name == "scheduler":  # the page's default sampler (DDIM) takes only Automatic
        changes["sampler_name"] = CHANGES["sampler_name"]
    if name in HIRES:  # with the hires fix on, so its fields are checked and used
        changes["enable_hr"] = CHANGES["enable_hr"]
    if name == "hr_scheduler":
        changes["hr_sampler_name"] = CHANGES["hr_sampler_name"]
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
    assert page.p.enable_hr and page.p.hr_cfg == 5.0 and page.p.hr_second_pass_steps == 3


def test_rule_controls_start_at_the_apis_defaults(doors):
    """Untouched, the rules' own controls give the job the API makes without those fields (and each rule field
    has a control)."""
    ctx, controls, api = doors
    defaults = sd_guidance.RuleParams()
    values = page_values(controls)
    names = [name for rule_fields in sd_guidance.RULE_FIELDS.values() for name in rule_fields]
    assert {n: values[n] for n in names} == {n: getattr(defaults, n) for n in names}
    body = {k: v for k, v in page_defaults_as_json(controls).items() if k not in names}
    page = page_job(ctx, controls, {"guidance": ("Dynamic negative", None)})
    api_ = api.job("txt2img", api.Txt2ImgRequest.model_validate({**body, "guidance": "Dynamic negative"}))
    assert page.p == api_.p


RULE_CHANGES = {rule: {name: CHANGES[name][1] for name in names} for rule, names in sd_guidance.RULE_FIELDS.items()}


@pytest.mark.parametrize("rule", sorted(RULE_CHANGES))
def test_pasted_infotext_fills_the_rule_controls_and_makes_the_apis_job(doors, rule):
    """PNG Info's / the result's "send to": an infotext with a rule's fields sets the rule dropdown and each of
    the rule's controls; the page's job is then the API's job sent that infotext."""
    from modules.processing import StableDiffusionProcessingTxt2Img
    from webui.ui import page_job as make
    from webui.ui_img2img import control_updates

    ctx, controls, api = doors
    changed = RULE_CHANGES[rule]
    params = sd_guidance.infotext_params(StableDiffusionProcessingTxt2Img(guidance=rule, **changed))
    text = ("a red circle\nNegative prompt: blue\nSteps: 4, Sampler: DDIM, CFG scale: 7, Seed: 5, Size: 64x64, "
            f"Guidance: {rule}, " + ", ".join(f"{k}: {v}" for k, v in params.items()))
    updates = control_updates(text, controls)
    assert updates[controls["guidance"]] == rule
    assert {name: updates[controls[name]] for name in changed} == changed
    values = {**page_values(controls), **{name: updates[c] for name, c in controls.items() if c in updates}}
    body = {k: v for k, v in page_defaults_as_json(controls).items() if k not in ("prompt", "negative_prompt")}
    for name in (*sd_guidance.RuleParams.__dataclass_fields__, "guidance", "steps", "seed", "width", "height",
                 "cfg_scale", "sampler_name"):
        body.pop(name, None)
    page, api_ = make(ctx, values), api.job("txt2img", api.Txt2ImgRequest.model_validate({**body, "infotext": text}))
    assert page.p == api_.p
    assert page.p.guidance == rule and {name: getattr(page.p, name) for name in changed} == changed


def test_page_hires_defaults_mean_the_first_pass(doors):
    ctx, controls, _ = doors
    from webui.ui import page_job as make

    p = make(ctx, {**page_values(controls), "enable_hr": True}).p
    assert p.enable_hr and (p.hr_sampler_name, p.hr_scheduler, p.hr_cfg) == (None, None, None)
    assert (p.hr_upscaler, p.hr_scale, p.denoising_strength) == ("Latent", 2.0, 0.7)  # AUTOMATIC1111's page defaults


# ---- img2img: the same check, with an init image (and masks) as the page and the API give them --------------

def png_file(path, size=(64, 64), color=(200, 30, 30), mode="RGB"):
    from PIL import Image

    im = Image.new(mode, size, color)
    im.save(path)
    return path


def b64(path) -> str:
    import base64

    return base64.b64encode(open(path, "rb").read()).decode()


@pytest.fixture()
def img2img_doors(page_and_api, tmp_path):
    ctx, demo, api = page_and_api
    return ctx, demo.sdneg_tabs["img2img"].fields, api, png_file(tmp_path / "init.png")


def img2img_jobs(ctx, controls, api, changes, page_images: dict, json_images: dict):
    from webui.ui import page_job as make

    values = page_values(controls)
    page_defaults = jobs.page_request({k: v for k, v in {**values, **page_images}.items()
                                       if not k.startswith("xyz_")}, {})
    values.update({name: page_value for name, (page_value, _) in changes.items()})
    values.update(page_images)
    page = make(ctx, values, "img2img")
    defaults = {k: v for k, v in page_defaults.items() if k not in ("init_images", "mask", "save_images")}
    body = {**defaults, **json_for(changes), **json_images, "save_images": bool(ctx.options.get("samples_save", True))}
    return page, api.job("img2img", api.Img2ImgRequest.model_validate(body))


@pytest.mark.parametrize("name", sorted(set(IMG2IMG_CHANGES) - set(CHANGES)) + ["prompt", "guidance", "seed"])
def test_img2img_page_and_api_make_the_same_job_for_each_field(img2img_doors, name):
    ctx, controls, api, init = img2img_doors
    page, api_ = img2img_jobs(ctx, controls, api, {name: IMG2IMG_CHANGES[name]}, {"init_img": str(init)},
                              {"init_images": [b64(init)]})
    assert page.p == api_.p and page.kind == api_.kind == "img2img"
    assert page.p.init_images[0].size == (64, 64) and page.p.mask is None


def test_img2img_page_and_api_make_the_same_job_with_everything_changed(img2img_doors):
    ctx, controls, api, init = img2img_doors
    page, api_ = img2img_jobs(ctx, controls, api, IMG2IMG_CHANGES, {"init_img": str(init)},
                              {"init_images": [b64(init)]})
    assert page.p == api_.p
    p = page.p
    assert (p.resize_mode, p.inpainting_fill, p.inpaint_full_res, p.inpainting_mask_invert) == (1, 2, True, 1)
    assert p.denoising_strength == 0.4 and p.mask_blur == 8 and p.inpaint_full_res_padding == 16


def test_img2img_inpaint_upload_and_drawn_mask_equal_the_apis_mask(img2img_doors, tmp_path):
    from PIL import Image

    from modules import images

    ctx, controls, api, init = img2img_doors
    mask = png_file(tmp_path / "mask.png", color=0, mode="L")
    Image.new("L", (20, 20), 255).save(tmp_path / "box.png")
    with Image.open(mask) as m, Image.open(tmp_path / "box.png") as box:
        m = m.copy()
        m.paste(box, (10, 10))
        m.save(mask)
    page, api_ = img2img_jobs(ctx, controls, api, {}, {"img2img_mode": "inpaint_upload", "init_img_inpaint": str(init),
                                                       "init_mask_inpaint": str(mask)},
                              {"init_images": [b64(init)], "mask": b64(mask)})
    assert page.p == api_.p and page.p.mask is not None

    # drawn in the browser: the editor's background and a layer, transparent but for the strokes
    background = Image.open(init).convert("RGBA")
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 10, 30, 30))
    drawn = {"img2img_mode": "inpaint", "init_img_with_mask": {"background": background, "layers": [layer],
                                                               "composite": background}}
    expected_mask = Image.new("L", (64, 64), 0)
    expected_mask.paste(255, (10, 10, 30, 30))
    import base64

    page, api_ = img2img_jobs(ctx, controls, api, {}, drawn,
                              {"init_images": [base64.b64encode(images.png_bytes(background)).decode()],
                               "mask": base64.b64encode(images.png_bytes(expected_mask)).decode()})
    assert page.p == api_.p
    import numpy as np

    assert (np.asarray(page.p.mask.convert("L")) == np.asarray(expected_mask)).all()


@pytest.mark.parametrize("inputs, field, message", [
    ({}, "init_images", "needs an init image"),
    ({"init_img": "BAD"}, "init_images", "not a valid PNG image"),
    ({"img2img_mode": "inpaint_upload", "init_img_inpaint": "INIT"}, "mask", "upload a mask"),
    ({"img2img_mode": "inpaint", "init_img_with_mask": {"background": "PIL", "layers": []}}, "mask", "draw over"),
    ({"init_img": "BIG"}, "init_images", "at most 2048"),
])
def test_img2img_page_refuses_bad_images_naming_the_field(img2img_doors, tmp_path, inputs, field, message):
    from PIL import Image

    from webui.ui import page_job as make

    ctx, controls, _, init = img2img_doors
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image at all")
    big = tmp_path / "big.png"
    Image.new("L", (2100, 8)).save(big)
    stand_in = {"BAD": str(bad), "BIG": str(big), "INIT": str(init), "PIL": Image.open(init)}
    inputs = {k: ({**v, "background": stand_in[v["background"]]} if isinstance(v, dict) else stand_in.get(v, v))
              for k, v in inputs.items()}
    with pytest.raises(InvalidParameter, match=message) as e:
        make(ctx, {**page_values(controls), **inputs}, "img2img")
    assert e.value.field == field


@pytest.mark.parametrize("option, value, field", [
    ("CLIP_stop_at_last_layers", 2, "clip_skip"),
    ("eta_ddim", 0.5, "eta"),
    ("s_min_uncond", 2.0, "s_min_uncond"),
])
def test_options_reach_page_and_api_jobs_alike(fresh_doors, option, value, field):
    from webui.ui import create_ui

    ctx, _, api = fresh_doors
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
    with pytest.raises(InvalidParameter, match="dng_prior is empty") as e:  # a rule's number box, emptied
        make(ctx, {**values, "guidance": "Dynamic negative", "dng_prior": None})
    assert e.value.field == "dng_prior"
    with pytest.raises(InvalidParameter, match="dng_prior must lie between dng_p_min and dng_p_max") as e:
        make(ctx, {**values, "guidance": "Dynamic negative", "dng_prior": 0.95})
    assert e.value.field == "dng_prior"
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
