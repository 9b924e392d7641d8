"""The tiny-shapes trainer is resumable bit for bit: N steps straight == N/2, stop, --resume, N/2."""
import os
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
import train_tiny_shapes as T  # noqa: E402


def _weights(work):
    st = torch.load(Path(work) / "ckpt.pt", weights_only=False)
    return st


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_bit_exact(tmp_path):
    """Stopped once inside the VAE phase and once inside the UNet phase, resumed each time."""
    common = ["--config", "tiny", "--no-export", "--out", str(tmp_path / "unused")]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert T.main(common + ["--work-dir", str(straight)]) == 0
    assert T.main(common + ["--work-dir", str(split), "--stop-after", "2"]) == 0
    mid = _weights(split)
    assert mid["phase"] == "vae" and mid["step"] == 2
    assert T.main(common + ["--work-dir", str(split), "--resume", "--stop-after", "7"]) == 0
    mid = _weights(split)
    assert mid["phase"] == "unet" and mid["step"] == 3
    assert T.main(common + ["--work-dir", str(split), "--resume"]) == 0

    a, b = _weights(straight), _weights(split)
    assert a["phase"] == b["phase"] == "export"
    for key in ("vae", "unet", "te"):
        _same(a[key], b[key])
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    assert a["log"]["unet"] == b["log"]["unet"]
    assert a["scaling_factor"] == b["scaling_factor"]


def test_more_unet_steps_reopen_a_finished_run_with_another_caption_mix(tmp_path):
    """How the shipped model got its last 2,100 steps: a finished run, resumed with a longer UNet
    schedule and another caption mix, trains exactly the extra steps, and says so in its log."""
    common = ["--config", "tiny", "--no-export", "--out", str(tmp_path / "unused"), "--work-dir", str(tmp_path / "w")]
    assert T.main(common) == 0
    done = _weights(tmp_path / "w")
    assert done["phase"] == "export" and len(done["log"]["unet"]) == 6
    assert T.main(common + ["--resume", "--unet-steps", "9", "--caption-drop", "1,0,1"]) == 0
    more = _weights(tmp_path / "w")
    assert more["phase"] == "export" and more["cfg"]["unet_steps"] == 9
    assert more["log"]["unet"][:6] == done["log"]["unet"] and len(more["log"]["unet"]) == 9
    assert more["cfg"]["caption_drop"] == [1.0, 0.0, 1.0]
    changed = {e["event"]: (e["old"], e["new"]) for e in more["log"]["events"] if e["event"].endswith("_changed")}
    assert changed == {"unet_steps_changed": (6, 9), "caption_drop_changed": (None, [1.0, 0.0, 1.0])}
    assert not torch.equal(more["unet"]["conv_in.weight"], done["unet"]["conv_in.weight"])  # it trained


def test_caption_drop_must_be_three_probabilities(tmp_path):
    with pytest.raises(SystemExit):
        T.main(["--config", "tiny", "--work-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--caption-drop", "0.5,2"])
    assert not (tmp_path / "ckpt.pt").exists()


def test_start_from_an_exported_model_continues_its_unet_phase(tmp_path):
    """How the shipped model got its last steps after its checkpoint was gone: the exported
    weights are the starting point, the step count, loss log and training time carry on."""
    first, cont = tmp_path / "first", tmp_path / "cont"
    assert T.main(["--config", "tiny", "--work-dir", str(tmp_path / "w1"), "--out", str(first)]) == 0
    run = ["--config", "tiny", "--work-dir", str(tmp_path / "w2"), "--out", str(cont)]
    args = run + ["--start-from", str(first), "--unet-steps", "9"]
    assert T.main(args + ["--stop-after", "10"]) == 0          # 4 VAE + 6 UNet steps: stops at once
    start = _weights(tmp_path / "w2")
    assert start["phase"] == "unet" and start["step"] == 6
    from diffusers import UNet2DConditionModel
    exported = UNet2DConditionModel.from_pretrained(str(first / "unet")).state_dict()
    _same({k: v.float() for k, v in exported.items()}, start["unet"])

    assert T.main(run + ["--resume"]) == 0
    import json
    before = json.loads((first / "train_log.json").read_text())
    after = json.loads((cont / "train_log.json").read_text())
    assert after["unet_loss"][:6] == before["unet_loss"] and len(after["unet_loss"]) == 9
    assert after["scaling_factor"] == before["scaling_factor"]
    assert after["wall_minutes"] > before["wall_minutes"]
    assert [e for e in after["events"] if e["event"] == "started_from_export"][0]["at_step"] == 6


def test_start_from_needs_more_unet_steps(tmp_path):
    assert T.main(["--config", "tiny", "--work-dir", str(tmp_path / "w1"), "--out", str(tmp_path / "m")]) == 0
    with pytest.raises(SystemExit):
        T.main(["--config", "tiny", "--work-dir", str(tmp_path / "w2"), "--out", str(tmp_path / "o"),
                "--start-from", str(tmp_path / "m"), "--unet-steps", "6"])
    assert not (tmp_path / "w2" / "ckpt.pt").exists()


def test_the_tiny_config_never_writes_the_shipped_model(tmp_path):
    with pytest.raises(SystemExit):
        T.main(["--config", "tiny", "--work-dir", str(tmp_path)])
    assert not (tmp_path / "ckpt.pt").exists()
