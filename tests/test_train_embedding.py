"""Embedding training: the file it writes, determinism across a resume, progress and stop, both objectives."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))

import train_embedding as T  # noqa: E402

from modules import sd_models  # noqa: E402
from modules import textual_inversion as ti  # noqa: E402


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return sd_models.load_model(tiny_model_dir, device="cpu")


def pictures(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        im = np.full((64, 64, 3), 240, np.uint8)
        x, y = rng.integers(0, 32, 2)
        im[y:y + 24, x:x + 24] = (200, 30, 30) if i % 2 else (30, 30, 200)
        out.append((im, "red square" if i % 2 else "blue square"))
    return out


def run(model, tmp_path, steps, resume=False, stop_at=None, **kw):
    calls = []

    def progress(step, total, loss):
        calls.append((step, total, loss))

    res = T.train_embedding(model, "tinyemb", pictures(), steps, num_vectors=2, init_text="square", batch_size=2,
                            learn_rate=0.05, seed=3, embeddings_dir=tmp_path / "out", work_dir=tmp_path / "work",
                            resume=resume, save_every=2, progress_callback=progress,
                            should_stop=(lambda: bool(calls) and calls[-1][0] >= stop_at) if stop_at else None,
                            show_progress=False, **kw)
    return res, calls


def test_writes_automatic1111_safetensors_that_load(model, tmp_path):
    res, calls = run(model, tmp_path, 4)
    assert res.steps_done == 4 and not res.interrupted
    assert [c[0] for c in calls] == [1, 2, 3, 4] and all(c[1] == 4 and np.isfinite(c[2]) for c in calls)
    from safetensors import safe_open

    with safe_open(str(res.path), "pt") as f:
        assert list(f.keys()) == ["emb_params"]
        meta = f.metadata()
        vec = f.get_tensor("emb_params")
    assert res.path == tmp_path / "out" / "tinyemb.safetensors"
    assert meta["name"] == "tinyemb" and meta["step"] == "4"
    assert meta["sd_checkpoint"] == model.shorthash and meta["sd_checkpoint_name"] == model.name
    init = ti.init_vectors(model.cond_stage, "square", 2)
    assert vec.shape == init.shape and not torch.equal(vec, init)  # it learnt
    m2 = sd_models.load_model(model.path, device="cpu", embeddings_dir=tmp_path / "out")
    e = m2.embedding_db.loaded["tinyemb"]
    assert e.step == 4 and e.sd_checkpoint == model.shorthash and torch.equal(e.vec, vec)
    assert model.cond_stage.embedding_db is None or "tinyemb" not in model.cond_stage.embedding_db.loaded


def test_resume_gives_the_same_vectors(model, tmp_path):
    straight, _ = run(model, tmp_path / "a", 6)
    first, calls = run(model, tmp_path / "b", 6, stop_at=3)
    assert first.interrupted and first.steps_done == 3
    resumed, calls = run(model, tmp_path / "b", 6, resume=True)
    assert resumed.steps_done == 6 and [c[0] for c in calls] == [4, 5, 6]
    assert torch.equal(straight.embedding.vec, resumed.embedding.vec)
    assert straight.losses == resumed.losses
    # and another seed gives other vectors (the comparison can fail)
    other = T.train_embedding(model, "tinyemb", pictures(), 6, num_vectors=2, init_text="square", batch_size=2,
                              learn_rate=0.05, seed=4, embeddings_dir=tmp_path / "c", work_dir=tmp_path / "cw",
                              show_progress=False)
    assert not torch.equal(other.embedding.vec, straight.embedding.vec)


def test_folder_with_captions_and_templates(model, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i, (im, caption) in enumerate(pictures(4)):
        Image.fromarray(im).resize((96, 80)).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(caption)
    items = T.load_folder(folder, 64)
    assert len(items) == 4 and items[0][0].shape == (64, 64, 3) and items[1][1] == "red square"
    assert T._caption_for("a photo of [name], [filewords]", "tinyemb", "red square") == "a photo of tinyemb, red square"
    assert T._caption_for("[name], [filewords]", "tinyemb", "") == "tinyemb"
    res = T.train_embedding(model, "folderemb", folder, 2, batch_size=2, embeddings_dir=tmp_path / "out",
                            work_dir=tmp_path / "w", template="a photo of [name], [filewords]", show_progress=False)
    assert res.path.is_file() and res.steps_done == 2


def test_negative_objective_runs_and_moves_the_vectors(model, tmp_path):
    keep = [(im, {"color": "red", "background": "white"}) for im, _ in pictures(4)]
    res = T.train_embedding(model, "negemb", None, 2, batch_size=2, embeddings_dir=tmp_path / "out",
                            work_dir=tmp_path / "w", keep_data=keep, ti_weight=0.0, show_progress=False,
                            init_text="square", num_vectors=1)
    assert res.steps_done == 2 and np.isfinite(res.loss)
    assert not torch.equal(res.embedding.vec, ti.init_vectors(model.cond_stage, "square", 1))


def test_learn_rate_schedule():
    sched = T.parse_learn_rate("0.005:100, 1e-3:1000, 1e-5", 2000)
    assert [T.learn_rate_at(sched, s) for s in (0, 99, 100, 999, 1000, 1999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5,
                                                                                  1e-5]
    assert T.parse_learn_rate(0.01, 10) == [(0.01, 10)]


def test_shapes_data_covers_every_colour_and_background():
    import shapes as S

    ex = T.ShapesData("square,triangle", pool=60).examples()
    assert {a["shape"] for _, a in ex} == {"square", "triangle"}
    assert {(a["color"], a["background"]) for _, a in ex} == {(c, b) for c in S.COLOR_NAMES for b in S.BACKGROUND_NAMES}
    assert all(S.judge(im)["shape"] == a["shape"] for im, a in ex[:10])


def test_contrast_objective_runs_deterministically(model, tmp_path):
    data = [(im, {"color": "red", "background": "white"}) for im, _ in pictures(4)]
    runs = [T.train_embedding(model, "conemb", None, 2, batch_size=2, embeddings_dir=tmp_path / f"o{i}",
                              work_dir=tmp_path / f"w{i}", ti_weight=0.0, contrast=T.Contrast("circle"),
                              contrast_data=data, show_progress=False, init_text="circle", num_vectors=2)
            for i in range(2)]
    assert runs[0].steps_done == 2 and np.isfinite(runs[0].loss)
    assert torch.equal(runs[0].embedding.vec, runs[1].embedding.vec)
    assert not torch.equal(runs[0].embedding.vec, ti.init_vectors(model.cond_stage, "circle", 2))
