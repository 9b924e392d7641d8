"""AUTOMATIC1111's POST /sdapi/v1/create/embedding and /sdapi/v1/train/embedding on the real server and tiny model:
the file written, the checks that refuse a request with nothing written, training on the queue with progress,
interrupt, and the embedding reloaded."""
from __future__ import annotations

import json
import re
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from safetensors import safe_open

from tests.server import start_server


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("embeddings")


@pytest.fixture(scope="module")
def server(tiny_model_dir, emb_dir):
    s = start_server(tiny_model_dir, "--nowebui", "--embeddings-dir", str(emb_dir))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    for i in range(4):
        im = np.full((64, 64, 3), 230, np.uint8)
        x, y = rng.integers(0, 32, 2)
        im[y:y + 24, x:x + 24] = (200, 30, 30) if i % 2 else (30, 30, 200)
        Image.fromarray(im).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("red square" if i % 2 else "blue square")
    return folder


def post(server, route, payload):
    return requests.post(f"{server.url}/sdapi/v1/{route}", json=payload, timeout=120)


def embeddings(server):
    r = requests.get(f"{server.url}/sdapi/v1/embeddings", timeout=30)
    assert r.status_code == 200
    return r.json()


def read(path):
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("emb_params"), f.metadata()


def files(folder):
    return sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file())


def test_create_embedding(server, emb_dir):
    r = post(server, "create/embedding", {"name": "tinyapi", "num_vectors_per_token": 3, "init_text": "square"})
    assert r.status_code == 200, r.text
    path = emb_dir / "tinyapi.safetensors"
    assert r.json() == {"info": f"create embedding filename: {path}"}
    vec, meta = read(path)
    assert vec.shape[0] == 3 and meta["step"] == "0" and float(vec.abs().sum()) > 0
    listed = embeddings(server)["loaded"]["tinyapi"]
    assert listed["vectors"] == 3 and listed["step"] == 0 and listed["shape"] == vec.shape[1]


@pytest.mark.parametrize("body, status, field", [
    ({"name": "tinyapi"}, 422, "name"),  # exists, no overwrite_old
    ({"name": "../escape"}, 422, "name"),
    ({"name": "sub/x"}, 422, "name"),
    ({"name": "  "}, 422, "name"),
    ({"name": "fresh", "num_vectors_per_token": 0}, 422, "num_vectors_per_token"),
    ({"name": "fresh", "num_vectors_per_token": 76}, 422, "num_vectors_per_token"),
])
def test_bad_create_writes_nothing(server, emb_dir, body, status, field):
    before = files(emb_dir.parent)
    r = post(server, "create/embedding", body)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert files(emb_dir.parent) == before
    assert "fresh" not in embeddings(server)["loaded"]


def train_body(root, tmp, **kw):
    return {"id_task": "task(x)", "embedding_name": "tinyapi", "learn_rate": "0.05:2, 0.02", "batch_size": 1,
            "gradient_step": 1, "data_root": str(root), "log_directory": str(tmp / "log"),
            "training_width": 64, "training_height": 64, "varsize": False, "steps": 12, "clip_grad_mode": "disabled",
            "clip_grad_value": "0.1", "shuffle_tags": False, "tag_drop_out": 0, "latent_sampling_method": "once",
            "use_weight": False, "create_image_every": 0, "save_embedding_every": 2,
            "template_filename": "style_filewords.txt", "save_image_with_stored_embedding": True,
            "preview_from_txt2img": False, "preview_prompt": "", "some_future_field": 1, **kw}


@pytest.mark.parametrize("change, status, field", [
    ({"data_root": "/no/such/folder"}, 422, "data_root"),
    ({"data_root": "EMPTY"}, 422, "data_root"),
    ({"embedding_name": "nosuch"}, 404, "embedding_name"),
    ({"steps": 0}, 422, "steps"),
    ({"learn_rate": "fast"}, 422, "learn_rate"),
    ({"training_width": 60}, 422, "training_width"),
    ({"log_directory": "A_FILE"}, 422, "log_directory"),
])
def test_bad_train_writes_nothing(server, emb_dir, data_root, tmp_path, change, status, field):
    if change.get("data_root") == "EMPTY":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "notes.txt").write_text("no images")
        change = {"data_root": str(tmp_path / "empty")}
    if change.get("log_directory") == "A_FILE":  # a file where the folder should be
        (tmp_path / "a-file").write_text("")
        change = {"log_directory": str(tmp_path / "a-file" / "log")}
    before = files(emb_dir)
    r = post(server, "train/embedding", train_body(data_root, tmp_path, **change))
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    assert files(emb_dir) == before and not (tmp_path / "log").exists()


def progress(server):
    return requests.get(f"{server.url}/sdapi/v1/progress?skip_current_image=true", timeout=30).json()


def train_in_thread(server, body):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", post(server, "train/embedding", body)))
    t.start()
    return t, out


def test_train_on_the_queue_with_progress_then_interrupt(server, emb_dir, data_root, tmp_path):
    path = emb_dir / "tinyapi.safetensors"
    before, _ = read(path)
    t, out = train_in_thread(server, train_body(data_root, tmp_path, steps=3))
    seen = []
    while t.is_alive():
        p = progress(server)
        if p["state"]["job"] == "train_embedding":
            seen.append((p["state"]["sampling_step"], p["state"]["sampling_steps"], p["textinfo"], p["progress"]))
        time.sleep(0.05)
    t.join()
    r = out["r"]
    assert r.status_code == 200, r.text
    assert r.json() == {"info": f"train embedding complete: filename: {path} error: None"}
    # (3 steps may pass between two polls on a fast machine: the long run below must show its progress)
    assert all(total == 3 for _, total, _, _ in seen), seen
    assert all(0 < frac <= 1 and text.startswith("[") and "/3] loss: " in text for s, _, text, frac in seen if s > 0)
    vec, meta = read(path)
    assert meta["step"] == "3" and vec.shape == before.shape and not np.allclose(vec.numpy(), before.numpy())
    listed = embeddings(server)["loaded"]["tinyapi"]
    assert listed["step"] == 3 and listed["vectors"] == 3  # reloaded
    assert progress(server)["state"]["job"] == ""

    # trained further (steps is the total, as AUTOMATIC1111's), then /interrupt stops it with what it has saved
    t, out = train_in_thread(server, train_body(data_root, tmp_path, steps=5000))
    deadline, seen = time.monotonic() + 60, []
    while time.monotonic() < deadline and (not seen or seen[-1]["state"]["sampling_step"] < 5):
        seen.append(progress(server))
        time.sleep(0.05)
    last = seen[-1]
    assert last["state"]["job"] == "train_embedding" and last["state"]["sampling_steps"] == 5000
    step = last["state"]["sampling_step"]
    assert step >= 5 and re.match(r"\[\d+/5000\] loss: \d", last["textinfo"]) and 0 < last["progress"] < 0.01
    # a generation job sent meanwhile waits in the queue: it never runs beside the training
    gen = {}
    g = threading.Thread(target=lambda: gen.setdefault("r", post(server, "txt2img", {
        "prompt": "tinyapi", "steps": 2, "width": 64, "height": 64, "sampler_name": "DDIM"})))
    g.start()
    time.sleep(0.5)
    assert g.is_alive() and progress(server)["state"]["job"] == "train_embedding"
    assert requests.post(f"{server.url}/sdapi/v1/interrupt", timeout=30).status_code == 200
    t.join(60)
    assert out["r"].status_code == 200 and out["r"].json()["info"].endswith("error: None")
    g.join(60)
    assert gen["r"].status_code == 200 and len(gen["r"].json()["images"]) == 1
    # the prompt used the (reloaded) embedding
    assert 'TI hashes: "tinyapi: ' in json.loads(gen["r"].json()["info"])["infotexts"][0]
    vec2, meta2 = read(path)
    stopped = int(meta2["step"])
    assert 5 <= stopped < 5000 and not np.allclose(vec2.numpy(), vec.numpy())
    assert embeddings(server)["loaded"]["tinyapi"]["step"] == stopped
    assert (tmp_path / "log" / "tinyapi" / "state.pt").is_file()  # the resume state

    # the next request continues from the stopped step (with the saved optimiser state)
    r = post(server, "train/embedding", train_body(data_root, tmp_path, steps=stopped + 1))
    assert r.status_code == 200 and r.json()["info"].endswith("error: None"), r.text
    assert read(path)[1]["step"] == str(stopped + 1)
    assert embeddings(server)["loaded"]["tinyapi"]["step"] == stopped + 1


def test_overwrite_old(server, emb_dir):
    """overwrite_old replaces <name>.safetensors; a same-named embedding in another file is a 422, nothing written."""
    import torch
    from safetensors.torch import save_file

    width = embeddings(server)["loaded"]["tinyapi"]["shape"]
    (emb_dir / "sub").mkdir()
    save_file({"emb_params": torch.ones(2, width)}, str(emb_dir / "sub" / "dup.safetensors"))
    assert post(server, "refresh-embeddings", None).status_code == 200
    before = files(emb_dir)
    r = post(server, "create/embedding", {"name": "dup", "overwrite_old": True})
    assert r.status_code == 422 and r.json()["field"] == "name" and "sub" in r.json()["detail"]
    assert files(emb_dir) == before
    r = post(server, "create/embedding", {"name": "tinyapi", "num_vectors_per_token": 1, "overwrite_old": True})
    assert r.status_code == 200, r.text
    assert read(emb_dir / "tinyapi.safetensors")[0].shape[0] == 1
    listed = embeddings(server)["loaded"]["tinyapi"]
    assert listed["vectors"] == 1 and listed["step"] == 0
