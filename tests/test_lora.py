"""LoRA: `<lora:...>` tags, kohya and diffusers layouts through diffusers' loaders, applied per job and removed."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules import extra_networks, extra_networks_lora, images, processing, sd_models
from modules.extra_networks import ExtraNetworkParams

UNET_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.2")
TE_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def kohya_lora(unet, text_encoders: dict[str, torch.nn.Module], rank: int = 4, alpha: float = 2.0, seed: int = 0,
               scale: float = 0.3) -> dict[str, torch.Tensor]:
    """A random LoRA in kohya-ss's key layout for these modules (`lora_unet_` + the diffusers module path with
    `_`, `lora_te_text_model_...` for CLIP; `lora_te1_` / `lora_te2_` for SDXL's two encoders)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def add(prefix, name, module):
        key = prefix + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, module.in_features, generator=g) * scale
        sd[f"{key}.lora_up.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
        sd[f"{key}.alpha"] = torch.tensor(alpha)

    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(UNET_TARGETS):
            add("lora_unet_", name, module)
    for prefix, te in text_encoders.items():
        for name, module in te.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(TE_TARGETS):
                add(prefix, "text_model_" + name.removeprefix("text_model."), module)
    return sd


def save(sd, path, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def lora_env(tiny_model_dir, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("Lora")
    model = sd_models.load_model(tiny_model_dir, device="cpu", lora_dir=lora_dir)
    sd = kohya_lora(model.unet, {"lora_te_": model.cond_stage.text_encoder})
    save(sd, lora_dir / "tiny.safetensors", {"ss_output_name": "tiny-alias", "ss_sd_model_name": "tiny-sd"})
    sub = lora_dir / "sub"
    sub.mkdir()
    save({k: v for k, v in sd.items() if k.startswith("lora_unet_")}, sub / "unetonly.safetensors")
    return model, lora_dir, sd


def job(model, prompt, negative="blue square", seed=7, steps=6, batch_size=1, hooks=(), **kw):
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative, steps=steps, seed=seed,
                                                    width=64, height=64, batch_size=batch_size,
                                                    do_not_save_samples=True, **kw)
    return processing.process_images(model, p, hooks=list(hooks))


def px(processed):
    return np.stack([np.asarray(im) for im in processed.images]).astype(np.float64)


class TextRecorder:
    """The encoder_hidden_states the UNet receives (its first call), through a forward pre-hook."""

    def __init__(self, unet):
        self.first = None
        self.handle = unet.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        if self.first is None:
            self.first = kwargs["encoder_hidden_states"].clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -- tags ------------------------------------------------------------------------------------------------
def test_parse_prompt_as_automatic1111():
    text, data = extra_networks.parse_prompt("a <lora:foo:0.5> cat <lora:bar:te=0.2:unet=1> <hypernet:h>")
    assert text == "a  cat  "
    assert data["lora"] == [ExtraNetworkParams(["foo", "0.5"]), ExtraNetworkParams(["bar", "te=0.2", "unet=1"])]
    assert data["hypernet"] == [ExtraNetworkParams(["h"])]
    r = extra_networks_lora.parse_lora_params(ExtraNetworkParams(["x", "0.5"]))
    assert (r.te_multiplier, r.unet_multiplier) == (0.5, 0.5)
    r = extra_networks_lora.parse_lora_params(ExtraNetworkParams(["x", "0.5", "-1.5"]))
    assert (r.te_multiplier, r.unet_multiplier) == (0.5, -1.5)
    r = extra_networks_lora.parse_lora_params(ExtraNetworkParams(["x", "te=0.25", "unet=2"]))
    assert (r.te_multiplier, r.unet_multiplier) == (0.25, 2.0)
    r = extra_networks_lora.parse_lora_params(ExtraNetworkParams(["x"]))
    assert (r.te_multiplier, r.unet_multiplier) == (1.0, 1.0)
    with pytest.raises(ValueError, match="not a number"):
        extra_networks_lora.parse_lora_params(ExtraNetworkParams(["x", "abc"]))
    # the tags of the first prompt count; every prompt loses its tags
    prompts, data = extra_networks.parse_prompts(["a <lora:one:1>", "b <lora:two:1>"])
    assert prompts == ["a ", "b "] and [p.items[0] for p in data["lora"]] == ["one"]


# -- the job ---------------------------------------------------------------------------------------------
def test_multiplier_zero_equals_no_lora_bit_for_bit(lora_env):
    model, _, _ = lora_env
    plain = px(job(model, "a red circle"))
    zero = job(model, "a red circle<lora:tiny:0>")
    assert np.array_equal(plain, px(zero)) and zero.comments == ""
    assert np.array_equal(plain, px(job(model, "a red circle<lora:tiny:te=0:unet=0>")))
    one = px(job(model, "a red circle<lora:tiny:1>"))
    assert np.abs(one - plain).mean() > 2.0  # the test can fail: the LoRA does change the image


def test_kohya_lora_matches_diffusers_load_lora_weights(lora_env, tiny_model_dir):
    from tests.tiny_sd import diffusers_pipeline

    model, lora_dir, _ = lora_env
    steps, seed, cfg = 8, 5, 7.0
    ours = px(job(model, "a red circle <lora:tiny:1>", seed=seed, steps=steps, cfg_scale=cfg))[0]
    pipe = diffusers_pipeline(tiny_model_dir)
    latents = torch.randn((4, 8, 8), generator=torch.Generator("cpu").manual_seed(seed))[None]
    plain_ref = pipe("a red circle ", negative_prompt="blue square", num_inference_steps=steps, guidance_scale=cfg,
                     latents=latents, output_type="np").images[0]
    pipe.load_lora_weights(str(lora_dir / "tiny.safetensors"))
    ref = pipe("a red circle ", negative_prompt="blue square", num_inference_steps=steps, guidance_scale=cfg,
               latents=latents, output_type="np").images[0]
    ref, plain_ref = (ref * 255).round(), (plain_ref * 255).round()
    assert np.abs(ours - ref).mean() < 1.0
    assert np.abs(ref - plain_ref).mean() > 2.0  # diffusers' LoRA moved the image too
    # diffusers applies a LoRA to the negative prompt's encoding as well; so do we (the text encoder is patched)


def test_plain_job_after_a_lora_job_is_unchanged_and_lora_cached(lora_env, monkeypatch):
    model, _, _ = lora_env
    before = px(job(model, "a red circle", batch_size=2))
    reads = []
    original = extra_networks_lora.read_lora_state_dict
    monkeypatch.setattr(extra_networks_lora, "read_lora_state_dict", lambda p: reads.append(p) or original(p))
    extra_networks_lora.unload_all(model)
    first = px(job(model, "a red circle <lora:tiny:0.8>", batch_size=2))
    again = px(job(model, "a red circle <lora:tiny:0.8>", batch_size=2))
    assert np.array_equal(first, again) and len(reads) == 1  # read once, kept loaded
    assert np.array_equal(before, px(job(model, "a red circle", batch_size=2)))  # off after the job, bit for bit
    assert len(model.lora_state.adapters) == 1
    # also after a job that failed halfway
    def boom(info):
        if info.step == 2:
            raise RuntimeError("failed on purpose")

    with pytest.raises(RuntimeError):
        job(model, "a red circle <lora:tiny:1>", batch_size=2, hooks=[boom])
    assert np.array_equal(before, px(job(model, "a red circle", batch_size=2)))


def test_te_and_unet_multipliers_are_separate_and_signed(lora_env):
    model, _, _ = lora_env
    with TextRecorder(model.unet) as plain_rec:
        plain = px(job(model, "a red circle", steps=2))
    with TextRecorder(model.unet) as unet_rec:
        unet_only = px(job(model, "a red circle <lora:tiny:0:1>", steps=2))
    with TextRecorder(model.unet) as te_rec:
        te_only = px(job(model, "a red circle <lora:tiny:te=1:unet=0>", steps=2))
    with TextRecorder(model.unet) as neg_rec:
        job(model, "a red circle <lora:tiny:te=-1:unet=0>", steps=2)
    assert torch.equal(plain_rec.first, unet_rec.first)  # te=0: the text encoder is untouched
    assert not torch.equal(plain_rec.first, te_rec.first)
    assert not np.array_equal(plain, unet_only) and not np.array_equal(plain, te_only)
    assert not torch.equal(te_rec.first, neg_rec.first)
    # a negative weight is the same LoRA subtracted: peft's scale is multiplier * alpha / rank
    from peft.tuners.lora import LoraLayer

    adapter = next(iter(model.lora_state.adapters.values())).name
    extra_networks_lora.activate(model, [ExtraNetworkParams(["tiny", "te=-1.5", "unet=0.5"])])
    try:
        te_layer = next(m for m in model.cond_stage.text_encoder.modules() if isinstance(m, LoraLayer))
        unet_layer = next(m for m in model.unet.modules() if isinstance(m, LoraLayer))
        assert te_layer.scaling[adapter] == pytest.approx(-1.5 * 2.0 / 4)
        assert unet_layer.scaling[adapter] == pytest.approx(0.5 * 2.0 / 4)
    finally:
        extra_networks_lora.deactivate(model)


def test_missing_bad_and_corrupt_loras_warn_and_the_job_runs(lora_env):
    model, lora_dir, sd = lora_env
    good = lora_dir / "tiny.safetensors"
    (lora_dir / "corrupt.safetensors").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    save({"something_else.weight": torch.randn(3, 3)}, lora_dir / "notalora.safetensors")
    wrong = {k: (torch.randn(4, 7) if k.endswith("lora_down.weight") else v) for k, v in sd.items()}
    save(wrong, lora_dir / "wrongshape.safetensors")
    try:
        plain = px(job(model, "a red circle"))
        for tag, words in [("<lora:missing:1>", "Networks not found: missing"),
                           ("<lora:tiny:abc>", "not a number"),
                           ("<lora:corrupt:1>", "corrupt"),
                           ("<lora:notalora:1>", "not a LoRA"),
                           ("<lora:wrongshape:1>", "does not fit"),
                           ("<hypernet:foo:1>", "not supported")]:
            res = job(model, f"a red circle{tag}")
            assert words in res.comments, (tag, res.comments)
            assert np.array_equal(plain, px(res)), tag  # ran without it
            assert "Lora hashes" not in res.infotexts[0]
        assert not any(a.name for a in model.lora_state.adapters.values()
                       if "wrongshape" in a.stamp[0] or "corrupt" in a.stamp[0])
        both = job(model, "a red circle <lora:missing:1> <lora:tiny:1>")
        assert "Networks not found: missing" in both.comments and "Lora hashes" in both.infotexts[0]
    finally:
        for name in ("corrupt", "notalora", "wrongshape"):
            (lora_dir / f"{name}.safetensors").unlink()


def test_lora_hashes_in_infotext_and_listing(lora_env):
    model, lora_dir, _ = lora_env
    res = job(model, "a red circle <lora:tiny-alias:0.5> <lora:unetonly:1>")  # by alias, and from a subfolder
    h_tiny = extra_networks_lora.addnet_hash_safetensors(lora_dir / "tiny.safetensors")[:12]
    h_unet = extra_networks_lora.addnet_hash_safetensors(lora_dir / "sub" / "unetonly.safetensors")[:12]
    params = images.parse_generation_parameters(res.infotexts[0])
    assert params["Lora hashes"] == f"tiny-alias: {h_tiny}, unetonly: {h_unet}"
    assert res.infotexts[0].startswith("a red circle <lora:tiny-alias:0.5> <lora:unetonly:1>\n")  # prompt as typed
    listing = extra_networks_lora.get_loras(lora_dir)
    assert [e["name"] for e in listing] == ["unetonly", "tiny"] or [e["name"] for e in listing] == ["tiny",
                                                                                                       "unetonly"]
    tiny = next(e for e in listing if e["name"] == "tiny")
    assert set(tiny) == {"name", "alias", "path", "metadata"}
    assert tiny["alias"] == "tiny-alias" and tiny["path"] == str(lora_dir / "tiny.safetensors")
    assert tiny["metadata"]["ss_sd_model_name"] == "tiny-sd"


def test_diffusers_peft_layout_equals_kohya_layout(lora_env, tmp_path):
    """The same weights in diffusers' key layout (as `save_lora_weights` writes them) give the same image."""
    model, lora_dir, sd = lora_env
    peft_sd = {}
    for key, value in sd.items():
        base, _, kind = key.partition(".")
        if kind == "alpha":
            continue
        if base.startswith("lora_unet_"):
            module = _module_name(model.unet, base.removeprefix("lora_unet_"))
            prefix = "unet."
        else:
            module = _module_name(model.cond_stage.text_encoder, base.removeprefix("lora_te_text_model_"))
            prefix = "text_encoder.text_model."
        peft_sd[prefix + module + (".lora_A.weight" if kind == "lora_down.weight" else ".lora_B.weight")] = value
    # kohya's alpha 2 over rank 4 scales by 0.5; diffusers' layout without alphas scales by 1
    peft_sd = {k: v * 0.5 if "lora_B" in k else v for k, v in peft_sd.items()}
    save(peft_sd, lora_dir / "peftlayout.safetensors")
    try:
        a = px(job(model, "a red circle <lora:tiny:1>"))
        b = px(job(model, "a red circle <lora:peftlayout:1>"))
        assert np.abs(a - b).max() <= 1.0
    finally:
        (lora_dir / "peftlayout.safetensors").unlink()


def _module_name(root, underscored: str) -> str:
    for name, _ in root.named_modules():
        if name.replace(".", "_") == underscored:
            return name
    raise KeyError(underscored)


def test_sdxl_lora(tmp_path, lora_env):
    from tests.tiny_checkpoints import build_models, save_folder

    _, _, sd1_lora = lora_env
    unet, vae, te, sched = build_models("sdxl")
    folder = save_folder(tmp_path / "xl", unet, vae, te, sched)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    model = sd_models.load_model(folder, device="cpu", lora_dir=lora_dir)
    save(kohya_lora(model.unet, {"lora_te1_": model.cond_stage.clip_l.text_encoder,
                                 "lora_te2_": model.cond_stage.clip_g.text_encoder}, seed=3), lora_dir / "xl.safetensors")
    save(sd1_lora, lora_dir / "sd1.safetensors")
    with TextRecorder(model.unet) as plain_rec:
        plain = px(job(model, "a red circle", steps=3))
    with TextRecorder(model.unet) as rec:
        res = job(model, "a red circle <lora:xl:1>", steps=3)
    assert res.comments == ""
    assert set(next(iter(model.lora_state.adapters.values())).components) == {"unet", "text_encoder",
                                                                              "text_encoder_2"}
    width_l = model.cond_stage.clip_l.text_encoder.config.hidden_size
    # both encoders' parts of the conditioning changed
    assert not torch.equal(plain_rec.first[..., :width_l], rec.first[..., :width_l])
    assert not torch.equal(plain_rec.first[..., width_l:], rec.first[..., width_l:])
    assert not np.array_equal(plain, px(res))
    assert np.array_equal(plain, px(job(model, "a red circle", steps=3)))
    wrong = job(model, "a red circle <lora:sd1:1>", steps=3)  # an SD 1.x LoRA does not fit SDXL's layers
    assert "sd1" in wrong.comments and np.array_equal(plain, px(wrong))
