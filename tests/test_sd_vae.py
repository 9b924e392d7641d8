"""VAE selection (modules/sd_vae.py, sd_models.swap_vae) on a tiny SD model.

The other VAEs are the tiny model's VAE architecture with other random weights, saved in
diffusers' layout, in the original (CompVis) layout (tests/tiny_checkpoints.vae_to_ldm, checked
there to be the inverse of diffusers' own conversion), with and without the `first_stage_model.`
prefix, and as a pickle; plus files that must be refused.
"""
from __future__ import annotations

import hashlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from modules import sd_models, sd_vae
from modules.errors import ModelLoadError, ModelNotFound
from tests import tiny_checkpoints as tc
from tests.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("vae")
    ckpt_dir, vae_dir = root / "Stable-diffusion", root / "VAE"
    folder = build_tiny_sd(ckpt_dir / "tiny", seed=0)
    config = dict(AutoencoderKL.load_config(folder / "vae"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}

    def random_vae(seed, **changes):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**{**config, **changes}).eval()
        with torch.no_grad():  # the default init leaves norms at 1/0: perturb them too, so every weight counts
            for p in vae.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return vae

    b, c = random_vae(1), random_vae(2)
    vae_dir.mkdir(parents=True)
    sd_b = {k: v.contiguous() for k, v in b.state_dict().items()}
    ldm_b = {k: v.contiguous() for k, v in tc.vae_to_ldm(b.state_dict(), b.config).items()}  # first_stage_model.*
    bare_b = {k.removeprefix("first_stage_model."): v for k, v in ldm_b.items()}
    save_file(sd_b, str(vae_dir / "b-diffusers.safetensors"))
    save_file(bare_b, str(vae_dir / "b-original.safetensors"))
    save_file(ldm_b, str(vae_dir / "b-prefixed.safetensors"))
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(vae_dir / "c.safetensors"))
    torch.save({"state_dict": {**bare_b, "model_ema.decay": torch.tensor(0.9999), "loss.logvar": torch.zeros(())}},
               vae_dir / "b-pickle.pt")
    wide = random_vae(3, latent_channels=16)
    save_file({k: v.contiguous() for k, v in wide.state_dict().items()}, str(vae_dir / "wide-16ch.safetensors"))
    other_widths = random_vae(4, block_out_channels=[16, 16, 32, 64])
    save_file({k: v.contiguous() for k, v in other_widths.state_dict().items()}, str(vae_dir / "widths.safetensors"))
    (vae_dir / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header" + bytes(100))
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, str(vae_dir / "a-lora.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(vae_dir / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"encoder.conv_in.weight": Evil()}}, f)
    (vae_dir / "sub").mkdir()
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(vae_dir / "sub" / "vae-10.safetensors"))
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(vae_dir / "sub" / "vae-9.safetensors"))
    # beside the checkpoint: the one meant for it, and a stray file that is no VAE of it
    save_file(sd_b, str(ckpt_dir / "tiny.vae.safetensors"))
    save_file(sd_b, str(ckpt_dir / "other.safetensors"))
    return {"root": root, "ckpt_dir": ckpt_dir, "vae_dir": vae_dir, "folder": folder, "b": b, "c": c,
            "cache": sd_models.HashCache(root / "hashes.json")}


@pytest.fixture(scope="module")
def loaded(world):
    return sd_models.load_model(world["folder"], device="cpu", hash_cache=world["cache"])


@pytest.fixture
def model(loaded):
    """The one loaded model, serving its own VAE at the start of each test (so each test also checks
    that the previous one's swaps were undone exactly)."""
    sd_vae.apply_vae(loaded, None)
    assert loaded.vae_info is None and loaded.base_vae is None
    return loaded


def latents(seed=7):
    return torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def decode_with(vae, lat, scaling_factor):
    with torch.no_grad():
        return vae.decode(lat / scaling_factor, return_dict=False)[0].float()


def info(world, name):
    return sd_vae.find_vae(name, [world["vae_dir"]], [world["ckpt_dir"]], hash_cache=world["cache"])


def test_list_and_find_as_automatic1111(world):
    vaes = sd_vae.list_vaes([world["vae_dir"]], [world["ckpt_dir"]], hash_cache=world["cache"])
    names = [v.name for v in vaes]
    assert "tiny.vae.safetensors" in names  # *.vae.* beside the checkpoints
    assert "other.safetensors" not in names  # other files there are checkpoints, not VAEs
    assert names.index("vae-9.safetensors") < names.index("vae-10.safetensors")  # natural sort, subfolders too
    assert names == sorted(names, key=sd_vae._natural_key)
    entry = next(v for v in vaes if v.name == "c.safetensors").api()
    assert entry == {"model_name": "c.safetensors", "filename": str(world["vae_dir"] / "c.safetensors")}
    assert sd_vae.vae_choices(vaes)[:3] == ["Automatic", "None", vaes[0].name]
    assert sd_vae.validate_setting("None", vaes) == "None" and sd_vae.validate_setting("c", vaes) == "c.safetensors"
    for bad in ("nope", 3, None):
        with pytest.raises(ModelNotFound):
            sd_vae.validate_setting(bad, vaes)
    assert info(world, "c").path == world["vae_dir"] / "c.safetensors"  # the name without its extension works too
    for bad in ("nope.safetensors", "../VAE/c.safetensors", str(world["vae_dir"] / "c.safetensors"), "", None):
        with pytest.raises(ModelNotFound):
            info(world, bad)
    assert sd_vae.vae_dirs_from_args(type("A", (), {"vae_dir": world["vae_dir"]})())[-1] == world["vae_dir"]


@pytest.mark.parametrize("name", ["b-diffusers.safetensors", "b-original.safetensors", "b-prefixed.safetensors"])
def test_a_swapped_vae_decodes_as_that_vae_and_none_restores_bit_for_bit(world, model, name):
    lat = latents()
    own_weights = {k: v.clone() for k, v in model.vae.state_dict().items()}
    own = model.decode_first_stage(lat)
    vae = info(world, name)
    assert sd_vae.apply_vae(model, vae) is vae
    swapped = model.decode_first_stage(lat)
    assert torch.equal(swapped, decode_with(world["b"], lat, model.scaling_factor))
    assert not torch.allclose(swapped, own, atol=1e-3)
    sha = hashlib.sha256(vae.path.read_bytes()).hexdigest()
    assert (model.vae_name, model.vae_hash) == (name, sha[:10])
    assert sd_vae.infotext_params(model) == {"VAE hash": sha[:10], "VAE": name}
    assert sd_vae.infotext_params(model, {"add_vae_hash_to_info": False}) == {"VAE hash": None, "VAE": name}
    # another VAE on top, then back to the checkpoint's own: the original weights, bit for bit
    sd_vae.apply_vae(model, info(world, "c.safetensors"))
    assert torch.equal(model.decode_first_stage(lat), decode_with(world["c"], lat, model.scaling_factor))
    assert sd_vae.apply_vae(model, None) is None
    assert torch.equal(model.decode_first_stage(lat), own)
    assert all(torch.equal(v, own_weights[k]) for k, v in model.vae.state_dict().items())
    assert model.vae_name is None and model.base_vae is None
    assert sd_vae.infotext_params(model) == {"VAE hash": None, "VAE": None}


@pytest.mark.parametrize("name, words", [
    ("wide-16ch.safetensors", ["does not fit", "16 latent channels", "4 latent channels"]),
    ("widths.safetensors", ["does not fit", "block widths [16, 16, 32, 64]", "block widths [16, 16, 32, 32]"]),
    ("corrupt.safetensors", ["not a readable .safetensors"]),
    ("a-lora.safetensors", ["is not a VAE"]),
    ("b-pickle.pt", ["pickle", "--allow-pickle-checkpoints"]),
    ("evil.ckpt", ["pickle"]),
])
def test_refused_files_leave_the_previous_vae_serving(world, model, name, words):
    lat = latents()
    sd_vae.apply_vae(model, info(world, "c.safetensors"))
    before = model.decode_first_stage(lat)
    with pytest.raises(ModelLoadError) as e:
        sd_vae.apply_vae(model, info(world, name))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert torch.equal(model.decode_first_stage(lat), before)
    assert model.vae_name == "c.safetensors"


def test_pickles_load_only_when_allowed_and_only_tensors(world, model, capsys):
    lat = latents()
    sd_vae.apply_vae(model, info(world, "b-pickle.pt"), allow_pickle=True)
    assert torch.equal(model.decode_first_stage(lat), decode_with(world["b"], lat, model.scaling_factor))
    with pytest.raises(ModelLoadError, match="weights_only"):
        sd_vae.apply_vae(model, info(world, "evil.ckpt"), allow_pickle=True)
    assert "pwned" not in capsys.readouterr().out
    assert model.vae_name == "b-pickle.pt"


def test_the_setting_resolves_as_automatic1111(world):
    vaes = sd_vae.list_vaes([world["vae_dir"]], [world["ckpt_dir"]])
    ckpt = world["folder"]
    near = sd_vae.resolve_vae("Automatic", ckpt, vaes)
    assert (near[0].name, near[1]) == ("tiny.vae.safetensors", "found near the checkpoint")
    assert sd_vae.resolve_vae("auto", ckpt, vaes)[0].name == "tiny.vae.safetensors"  # A1111's old value
    assert sd_vae.resolve_vae("None", ckpt, vaes)[0] is None
    assert sd_vae.resolve_vae("c.safetensors", ckpt, vaes)[0].name == "c.safetensors"
    gone = sd_vae.resolve_vae("deleted.safetensors", ckpt, vaes)
    assert gone[0] is None and "not found" in gone[1]
    assert sd_vae.resolve_vae("Automatic", world["ckpt_dir"] / "unrelated.safetensors", vaes)[0] is None
    # a VAE beside the checkpoint wins over a named one when the named one does not override it
    assert sd_vae.resolve_vae("c.safetensors", ckpt, vaes, overrides_per_model=False)[0].name == "tiny.vae.safetensors"
    forced = sd_vae.resolve_vae("None", ckpt, vaes, vae_path=world["vae_dir"] / "c.safetensors")
    assert (forced[0].name, forced[1]) == ("c.safetensors", "from commandline argument")


def test_apply_setting_and_a_switch_start_from_the_checkpoints_own(world, model):
    vaes = sd_vae.list_vaes([world["vae_dir"]], [world["ckpt_dir"]], hash_cache=world["cache"])
    lat = latents()
    own = model.decode_first_stage(lat)
    served, source = sd_vae.apply_vae_setting(model, "Automatic", vaes)
    assert served.name == "tiny.vae.safetensors" and source == "found near the checkpoint"
    assert torch.equal(model.decode_first_stage(lat), decode_with(world["b"], lat, model.scaling_factor))
    assert sd_vae.apply_vae_setting(model, "None", vaes)[0] is None
    assert torch.equal(model.decode_first_stage(lat), own)
    other = sd_models.load_model(world["folder"], device="cpu", hash_cache=world["cache"])
    sd_vae.apply_vae(other, info(world, "c.safetensors"))
    assert other.base_vae is not None
    fresh = sd_models.switch_model(other, world["folder"], device="cpu", hash_cache=world["cache"])
    assert other.base_vae is None  # the switched-from model was freed, its kept VAE weights too
    assert fresh.vae_name is None and torch.equal(fresh.decode_first_stage(lat), own)


@pytest.mark.parametrize("offload", ["medvram", "lowvram"])
def test_swap_under_cpu_offload(world, offload):
    model = sd_models.load_model(world["folder"], device="cpu", offload=offload, hash_cache=world["cache"])
    lat = latents()
    own = model.decode_first_stage(lat)
    sd_vae.apply_vae(model, info(world, "b-original.safetensors"))
    assert torch.allclose(model.decode_first_stage(lat), decode_with(world["b"], lat, model.scaling_factor), atol=1e-6)
    with pytest.raises(ModelLoadError):
        sd_vae.apply_vae(model, info(world, "wide-16ch.safetensors"))
    sd_vae.apply_vae(model, None)
    assert torch.equal(model.decode_first_stage(lat), own)
