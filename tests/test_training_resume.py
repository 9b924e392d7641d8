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
        T.main(["--config", "tiny", "--work-dir", str(tmp_path), "--caption-drop", "0.5,2"])
    assert not (tmp_path / "ckpt.pt").exists()
