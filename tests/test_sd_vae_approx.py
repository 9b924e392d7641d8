"""Preview methods (modules/sd_vae_approx.py): AUTOMATIC1111's linear factors, the embedded model's own
learned preview decoder (value test against its VAE), the fallback to the linear map, and TAESD decoders
read from a VAE-approx folder."""
from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from modules import processing, sd_models, sd_vae_approx

REPO = Path(__file__).resolve().parent.parent
EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
DECODER_FILE = EMBEDDED / sd_vae_approx.PREVIEW_DECODER_FILE
FULL_PROMPTS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue", "yellow", "purple")
                for s in ("circle", "square", "triangle") for b in ("white", "black", "gray")]


def levels(preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean |preview - reference| per 8-bit channel per image, the preview upscaled bilinearly first."""
    if preview.shape[-2:] != reference.shape[-2:]:
        preview = torch.nn.functional.interpolate(preview, size=reference.shape[-2:], mode="bilinear",
                                                  align_corners=False)
    q = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    return (q(preview) - q(reference)).abs().flatten(1).mean(1)


def without_decoder(model):
    m = copy.copy(model)
    m.__dict__["preview_decoder"] = None
    return m


# -- AUTOMATIC1111's factors -------------------------------------------------------------------------
def test_latent_rgb_factors_are_automatic1111s():
    """The numbers of AUTOMATIC1111's modules/sd_vae_approx.py cheap_approximation, typed in again here;
    SD 2.x uses SD 1.x's (A1111 has no SD 2 branch: same VAE), and no bias anywhere."""
    sd1 = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
    sdxl = [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
            [-0.3730, -0.2499, -0.2088]]
    sd3 = [[-0.0645, 0.0177, 0.1052], [0.0028, 0.0312, 0.0650], [0.1848, 0.0762, 0.0360], [0.0944, 0.0360, 0.0889],
           [0.0897, 0.0506, -0.0364], [-0.0020, 0.1203, 0.0284], [0.0855, 0.0118, 0.0283],
           [-0.0539, 0.0658, 0.1047], [-0.0057, 0.0116, 0.0700], [-0.0412, 0.0281, -0.0039],
           [0.1106, 0.1171, 0.1220], [-0.0248, 0.0682, -0.0481], [0.0815, 0.0846, 0.1207],
           [-0.0120, -0.0055, -0.0867], [-0.0749, -0.0634, -0.0456], [-0.1418, -0.1457, -0.1259]]
    assert sd_models.SD1_LATENT_RGB == sd1
    assert sd_models.SDXL_LATENT_RGB == sdxl
    assert sd_models.SD3_LATENT_RGB == sd3
    for arch, factors in (("sd1", sd1), ("sd2", sd1), ("sdxl", sdxl), ("sd3", sd3)):
        assert sd_models.default_latent_rgb(arch) == (factors, [0.0, 0.0, 0.0])


def test_tiny_sd1_model_previews_with_sd1_factors(tiny_model):
    assert tiny_model.preview_decoder is None and sd_vae_approx.cheap_kind(tiny_model) == "linear"
    assert tiny_model.latent_rgb == (sd_models.SD1_LATENT_RGB, [0.0, 0.0, 0.0])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb = sd_vae_approx.latents_to_rgb(tiny_model, x, "cheap")
    assert torch.equal(rgb, sd_vae_approx.cheap_approximation(x, sd_models.SD1_LATENT_RGB))


# -- the embedded model's preview decoder ----------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    return sd_models.load_model(EMBEDDED, device="cpu")


def test_decoder_file_is_small_safetensors_and_loads_without_pickle(monkeypatch):
    assert DECODER_FILE.is_file() and DECODER_FILE.stat().st_size < 400_000

    def refuse(*a, **k):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    decoder = sd_vae_approx.load_preview_decoder(DECODER_FILE)
    assert isinstance(decoder, sd_vae_approx.PreviewDecoder)
    assert decoder.config["latent_channels"] == 4 and decoder.config["upscale"] == 4
    out = decoder(torch.zeros(1, 4, 16, 16))
    assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32


def test_preview_decoder_round_trip(tmp_path):
    torch.manual_seed(0)
    dec = sd_vae_approx.PreviewDecoder(channels=8, depth=2, upscale=8, dilations=[1, 2], global_context=True).eval()
    path = sd_vae_approx.save_preview_decoder(dec, tmp_path / "d.safetensors", {"training": {"steps": 3}},
                                              dtype=torch.float32)
    back = sd_vae_approx.load_preview_decoder(path)
    assert back.config == dec.config
    x = torch.randn(2, 4, 5, 6)
    with torch.no_grad():
        assert torch.equal(back(x), dec(x))
    assert back(x).shape == (2, 3, 40, 48)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "preview_decoder"
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        sd_vae_approx.load_preview_decoder(tmp_path / "bad.safetensors")


def test_embedded_model_cheap_preview_uses_its_decoder(embedded):
    assert isinstance(embedded.preview_decoder, sd_vae_approx.PreviewDecoder)
    assert sd_vae_approx.cheap_kind(embedded) == "decoder"
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    rgb = sd_vae_approx.latents_to_rgb(embedded, x, "cheap")
    assert rgb.shape == (3, 3, 64, 64) and rgb.min() >= -1 and rgb.max() <= 1 and rgb.device.type == "cpu"


def test_embedded_cheap_preview_of_a_finished_image_is_close_to_the_vae(embedded):
    """DDIM 20 steps, CFG 7, three seeds and prompts of the 45: the cheap preview of the last step's
    pred_x0 is within 12 levels (mean per 8-bit channel) of the VAE's decode of the same latents; the
    linear map it replaced is not (it was ~50)."""
    last = []
    for seed in (0, 1, 2):
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=FULL_PROMPTS[(seed * 7) % 45], steps=20, cfg_scale=7, sampler_name="DDIM", seed=seed,
            width=64, height=64, do_not_save_samples=True)
        kept = []
        processing.process_images(embedded, p, hooks=[lambda info: kept.append(info.pred_x0)])
        last.append(kept[-1])
    x = torch.cat(last)
    full = sd_vae_approx.latents_to_rgb(embedded, x, "full")
    new = levels(sd_vae_approx.latents_to_rgb(embedded, x, "cheap"), full)
    old = levels(sd_vae_approx.latents_to_rgb(without_decoder(embedded), x, "cheap"), full)
    assert (new <= 12).all(), new
    assert (old > 25).all(), old  # the measurement does tell the two apart


def test_missing_decoder_file_falls_back_to_the_linear_map(embedded, tmp_path):
    folder = tmp_path / "no-decoder"
    folder.mkdir()
    m = copy.copy(embedded)
    m.__dict__.pop("preview_decoder", None)
    m.path = folder
    assert m.preview_decoder is None and sd_vae_approx.cheap_kind(m) == "linear"
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    rgb = sd_vae_approx.latents_to_rgb(m, x, "cheap")
    factors, bias = embedded.latent_rgb  # the folder's fitted latent_rgb.json
    assert rgb.shape == (2, 3, 16, 16)
    assert torch.equal(rgb, sd_vae_approx.cheap_approximation(x, factors, bias))
    # a damaged file is ignored the same way (with a warning), the model still previews
    (folder / sd_vae_approx.PREVIEW_DECODER_FILE).write_bytes(b"\x00" * 20)
    m.__dict__.pop("preview_decoder", None)
    assert m.preview_decoder is None
    assert torch.equal(sd_vae_approx.latents_to_rgb(m, x, "cheap"), rgb)
    # and the shipped file, copied there, is found
    shutil.copy(DECODER_FILE, folder / sd_vae_approx.PREVIEW_DECODER_FILE)
    m.__dict__.pop("preview_decoder", None)
    assert isinstance(m.preview_decoder, sd_vae_approx.PreviewDecoder)


def test_single_file_checkpoint_finds_its_decoder_beside_it(tmp_path):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    assert sd_vae_approx.find_preview_decoder(ckpt) is None
    (tmp_path / "model.preview_decoder.safetensors").write_bytes(b"")
    assert sd_vae_approx.find_preview_decoder(ckpt) == tmp_path / "model.preview_decoder.safetensors"


# -- TAESD -----------------------------------------------------------------------------------------------
def tiny_taesd():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    return AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                           num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4).eval()


def madebyollin_layout(decoder_state: dict) -> dict:
    """diffusers' DecoderTiny keys (`layers.N.…`) -> taesd_decoder.pth's (`N+1.…`, index 0 the clamp)."""
    out = {}
    for k, v in decoder_state.items():
        head, _, rest = k[len("layers."):].partition(".")
        out[f"{int(head) + 1}.{rest}"] = v
    return out


def test_taesd_from_a_saved_tiny_autoencoder(tiny_model, tmp_path):
    from safetensors.torch import save_file

    ae = tiny_taesd()
    d = tmp_path / "VAE-approx"
    d.mkdir()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ae.decode(x).sample.clamp(-1, 1)
    assert sd_vae_approx.available_methods(tiny_model, d) == ["cheap", "full"]
    used, reason = sd_vae_approx.resolve_method(tiny_model, "taesd", d)
    assert used == "cheap" and "taesd_decoder.safetensors" in reason
    fallback = sd_vae_approx.latents_to_rgb(tiny_model, x, "taesd", vae_approx_dir=d)
    assert torch.equal(fallback, sd_vae_approx.latents_to_rgb(tiny_model, x, "cheap"))

    # the whole AutoencoderTiny's state dict in diffusers' naming (what madebyollin/taesd on the Hub has)
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(d / "taesd_decoder.safetensors"))
    assert sd_vae_approx.available_methods(tiny_model, d) == ["cheap", "taesd", "full"]
    assert sd_vae_approx.resolve_method(tiny_model, "TAESD", d) == ("taesd", None)
    rgb = sd_vae_approx.latents_to_rgb(tiny_model, x, "taesd", vae_approx_dir=d)
    assert rgb.shape == (2, 3, 64, 64) and rgb.device.type == "cpu"
    torch.testing.assert_close(rgb, expected)

    # madebyollin's own layout, as a pickle: refused unless the model was loaded with pickles allowed
    (d / "taesd_decoder.safetensors").unlink()
    torch.save(madebyollin_layout(ae.decoder.state_dict()), d / "taesd_decoder.pth")
    used, reason = sd_vae_approx.resolve_method(tiny_model, "taesd", d)
    assert used == "cheap" and "pickle" in reason
    trusting = copy.copy(tiny_model)
    trusting.allow_pickle = True
    assert sd_vae_approx.resolve_method(trusting, "taesd", d) == ("taesd", None)
    torch.testing.assert_close(sd_vae_approx.latents_to_rgb(trusting, x, "taesd", vae_approx_dir=d), expected)


def test_taesd_file_per_architecture_and_vae_mismatch(tiny_model, embedded, tmp_path):
    from safetensors.torch import save_file

    ae = tiny_taesd()
    d = tmp_path / "VAE-approx"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in ae.decoder.state_dict().items()}, str(d / "taesd_decoder.safetensors"))
    xl = copy.copy(tiny_model)
    xl.arch = "sdxl"
    used, reason = sd_vae_approx.resolve_method(xl, "taesd", d)
    assert used == "cheap" and "taesdxl_decoder" in reason
    shutil.copy(d / "taesd_decoder.safetensors", d / "taesdxl_decoder.safetensors")
    assert sd_vae_approx.resolve_method(xl, "taesd", d) == ("taesd", None)
    # the embedded model's VAE is 4x with its own latent space: an SD TAESD decoder does not fit it
    used, reason = sd_vae_approx.resolve_method(embedded, "taesd", d)
    assert used == "cheap" and "4x" in reason
    with pytest.raises(ValueError):
        sd_vae_approx.resolve_method(tiny_model, "blurry", d)
    with pytest.raises(ValueError):
        sd_vae_approx.taesd_decoder_from_state_dict({"encoder.layers.0.weight": torch.zeros(1)})
