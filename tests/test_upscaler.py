"""Upscalers (latent modes, Lanczos / Nearest, ESRGAN models through spandrel), resize modes, tiles,
and AUTOMATIC1111's SD upscale script on a tiny model."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from modules import images, processing, upscaler
from modules.errors import InvalidParameter, ModelLoadError
from modules.processing import StableDiffusionProcessingImg2Img, StableDiffusionProcessingTxt2Img
from modules.scripts import sd_upscale
from tests.test_engine import UNetRecorder

NF, GC = 8, 32  # num filters; spandrel's RRDBNet has a fixed growth of 32 channels


def tiny_rrdbnet_state_dict(scale: int = 4, blocks: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Real-ESRGAN-layout RRDBNet state dict (conv_first, body.N.rdbK.convJ, conv_body, conv_up1/2,
    conv_hr, conv_last), tiny: 8 filters, one block. spandrel knows it as ESRGAN from these keys."""
    g = torch.Generator().manual_seed(seed)

    def conv(out_c, in_c):
        return {"weight": torch.randn(out_c, in_c, 3, 3, generator=g) * 0.02, "bias": torch.zeros(out_c)}

    sd = {}

    def put(prefix, c):
        sd.update({f"{prefix}.{k}": v for k, v in c.items()})

    put("conv_first", conv(NF, 3))
    for b in range(blocks):
        for r in range(1, 4):
            for j in range(1, 6):
                put(f"body.{b}.rdb{r}.conv{j}", conv(NF if j == 5 else GC, NF + (j - 1) * GC))
    put("conv_body", conv(NF, NF))
    for u in range(1, int(np.log2(scale)) + 1):
        put(f"conv_up{u}", conv(NF, NF))
    put("conv_hr", conv(NF, NF))
    put("conv_last", conv(3, NF))
    return sd


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("models")
    (root / "ESRGAN").mkdir()
    save_file(tiny_rrdbnet_state_dict(4), str(root / "ESRGAN" / "4x-Tiny.safetensors"))
    save_file(tiny_rrdbnet_state_dict(2, seed=1), str(root / "ESRGAN" / "Tiny_x2.safetensors"))
    torch.save(tiny_rrdbnet_state_dict(4, seed=2), str(root / "ESRGAN" / "Pickled.pth"))
    return root


def picture(w=48, h=40) -> Image.Image:
    im = Image.new("RGB", (w, h), "white")
    ImageDraw.Draw(im).ellipse((8, 6, w - 10, h - 8), fill=(200, 30, 30))
    return im


def test_upscaler_lists_have_automatic1111s_shape(models_dir):
    listed = [u.js() for u in upscaler.list_upscalers(models_dir)]
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "4x-Tiny", "Pickled", "Tiny_x2"]
    assert set(listed[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    assert listed[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    tiny = listed[3]
    assert tiny["model_name"] == "ESRGAN" and tiny["model_path"].endswith("4x-Tiny.safetensors") and tiny["scale"] == 4
    assert listed[5]["scale"] == 2
    assert upscaler.latent_upscale_modes() == [
        {"name": "Latent"}, {"name": "Latent (antialiased)"}, {"name": "Latent (bicubic)"},
        {"name": "Latent (bicubic antialiased)"}, {"name": "Latent (nearest)"}, {"name": "Latent (nearest-exact)"}]
    assert upscaler.list_upscalers(models_dir / "nowhere")[-1].name == "Nearest"


@pytest.mark.parametrize("mode", [m["name"] for m in upscaler.latent_upscale_modes()])
def test_latent_upscale_modes(mode):
    x = torch.randn(2, 4, 8, 8)
    y = upscaler.upscale_latent(x, mode, (16, 12))
    assert y.shape == (2, 4, 16, 12)
    if mode == "Latent (nearest)":
        assert torch.equal(y[:, :, ::2, :], y[:, :, 1::2, :])


def test_spandrel_loads_an_esrgan_state_dict_without_torchvision(models_dir):
    code = ("import sys; from modules import upscaler; d = upscaler.load_upscaler_model(sys.argv[1]); "
            "print(d.architecture.id, d.scale, 'torchvision' in sys.modules); import transformers; "
            "from transformers import CLIPTextModel; print('transformers ok')")
    out = subprocess.run([sys.executable, "-c", code, str(models_dir / "ESRGAN" / "4x-Tiny.safetensors")],
                         capture_output=True, text=True, cwd=str(upscaler.REPO), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["ESRGAN", "4", "False", "transformers", "ok"]


def test_esrgan_upscale_by_scale_and_to_size(models_dir):
    im = picture()
    up = upscaler.upscale_image(im, "4x-Tiny", scale=2, models_dir=models_dir)
    assert up.size == (96, 80)  # int(side * scale) // 8 * 8, after one 4x pass and a Lanczos step down
    two = upscaler.upscale_image(im, "Tiny_x2", scale=4, models_dir=models_dir)
    assert two.size == (192, 160)  # two 2x passes
    sized = upscaler.upscale_image(im, "4x-Tiny", size=(100, 60), models_dir=models_dir)
    assert sized.size == (100, 60)
    lanczos = upscaler.upscale_image(im, "Lanczos", scale=2)
    assert lanczos.size == (96, 80)
    nearest = np.asarray(upscaler.upscale_image(im, "Nearest", scale=2))
    assert np.array_equal(nearest[::2, ::2], np.asarray(im))


def test_pickled_upscalers_are_refused_unless_allowed(models_dir):
    with pytest.raises(ModelLoadError, match="pickle"):
        upscaler.upscale_image(picture(), "Pickled", scale=2, models_dir=models_dir)
    up = upscaler.upscale_image(picture(), "Pickled", scale=2, models_dir=models_dir, allow_pickle=True)
    assert up.size == (96, 80)


def test_unknown_upscaler_names_what_exists(models_dir):
    with pytest.raises(InvalidParameter) as e:
        upscaler.upscale_image(picture(), "R-ESRGAN 4x+", scale=2, models_dir=models_dir)
    assert e.value.field == "hr_upscaler" and e.value.status_code == 422
    assert "Latent (bicubic)" in str(e.value) and "4x-Tiny" in str(e.value) and "Lanczos" in str(e.value)


def test_not_an_upscaler(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "ESRGAN").mkdir()
    save_file({"foo.weight": torch.zeros(3, 3)}, str(tmp_path / "ESRGAN" / "junk.safetensors"))
    with pytest.raises(ModelLoadError, match="not an upscaler model"):
        upscaler.upscale_image(picture(), "junk", scale=2, models_dir=tmp_path)


def test_resize_modes():
    im = Image.new("RGB", (80, 40), "white")  # 2:1 into 1:1, red bands at both ends
    ImageDraw.Draw(im).rectangle((0, 0, 9, 39), fill=(255, 0, 0))
    ImageDraw.Draw(im).rectangle((70, 0, 79, 39), fill=(255, 0, 0))
    assert images.resize_image(0, im, 64, 64).size == (64, 64)
    crop = np.asarray(images.resize_image(1, im, 64, 64))
    assert crop.shape == (64, 64, 3) and (crop[..., 1] > 200).all()  # the red ends are cut off
    fill = np.asarray(images.resize_image(2, im, 64, 64))
    assert fill.shape == (64, 64, 3)
    assert np.abs(fill[0].astype(int) - fill[16].astype(int)).max() <= 2  # top band: the first row stretched
    flat = images.flatten(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "#ffffff")
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)


def test_split_and_combine_grid_round_trip():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 140, 3), dtype=np.uint8))
    grid = images.split_grid(im, tile_w=64, tile_h=64, overlap=16)
    assert len(grid.tiles) == 2 and len(grid.tiles[0][2]) == 3
    assert all(t.size == (64, 64) for _, _, row in grid.tiles for _, _, t in row)
    assert np.array_equal(np.asarray(images.combine_grid(grid)), np.asarray(im))


def test_hires_fix_with_an_esrgan_model(tiny_model, models_dir):
    p = StableDiffusionProcessingTxt2Img(prompt="a", steps=3, seed=1, width=64, height=64, enable_hr=True,
                                         hr_scale=1.5, hr_upscaler="4x-Tiny", do_not_save_samples=True)
    with pytest.raises(InvalidParameter):  # not in the repository's models/ESRGAN
        processing.process_images(tiny_model, p)
    p.upscaler_models_dir = str(models_dir)
    result = processing.process_images(tiny_model, p)
    assert result.images[0].size == (96, 96)
    assert "Hires upscaler: 4x-Tiny" in result.infotexts[0]


def test_sd_upscale_script(tiny_model, models_dir, tmp_path):
    init = picture(64, 64)
    p = StableDiffusionProcessingImg2Img(prompt="a red circle", init_images=[init], steps=4, seed=7, width=64,
                                         height=64, denoising_strength=0.3, batch_size=2,
                                         outpath_samples=str(tmp_path))
    p.upscaler_models_dir = str(models_dir)
    runs = []

    def counting(model, q, hooks=(), state=None):
        runs.append((len(q.init_images), q.seed))
        return processing.process_images(model, q, hooks=hooks, state=state)

    with UNetRecorder(tiny_model.unet) as rec:
        result = sd_upscale.run_sd_upscale(tiny_model, p, [None, 32, 1, 2], process=counting)  # Lanczos, 2x
    assert result.images[0].size == (128, 128)
    # 128 px with 64 px tiles overlapping by 32: 3 x 3 tiles, two per img2img batch, the seed up by one per batch
    assert runs == [(2, 7), (2, 8), (2, 9), (2, 10), (1, 11)]
    assert {shape[-1] for shape, _ in rec.calls} == {8}  # every UNet call on one 64 px tile
    assert "SD upscale overlap: 32, SD upscale upscaler: Lanczos" in result.infotexts[0]
    assert len(result.saved_paths) == 1 and result.saved_paths[0].endswith("-7.png")
    named = sd_upscale.parse_args({"overlap": 16, "upscaler_name": "4x-Tiny", "scale_factor": 2}, models_dir)
    assert named[1].name == "4x-Tiny"
    for bad in ([None, 300, 1, 2], [None, 32, 99, 2], [None, 32, 1, 9], "x"):
        with pytest.raises(InvalidParameter):
            sd_upscale.parse_args(bad, models_dir)
