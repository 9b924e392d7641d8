"""The Ray Serve back-end on loopback: a real local Ray instance, 2 CPU replicas, tiny models.

One Ray instance, one deployment and one server, the page and the API (uvicorn in a thread of this
process, the Ray driver), for the whole module: starting Ray and its replicas is most of its time.
Every image is compared, bit for bit, with the same job run in-process on the same model.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from tests.server import REPO, free_port
from tests.tiny_sd import build_tiny_sd

STEPS = 8
SCALE_STEPS = 2  # the scale test's jobs: few steps, 64x64, the tiny model
API_JOBS, CLIENTS = 38, 8  # with the 2 page sessions' jobs: the issue's 40 jobs
PAGE_STEPS = (3, 5)  # each page session its own step count: another's previews would show the wrong "Step i/N"


def request(seed: int, steps: int = STEPS, **extra) -> dict:
    return {"prompt": "a red circle", "negative_prompt": "blue", "steps": steps, "seed": seed, "width": 64,
            "height": 64, "sampler_name": "DDIM", **extra}


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(ctx on Ray, ctx in-process, the server's URL (page and API), {name: model}) — one local Ray for the module."""
    import uvicorn

    import app as app_module
    from modules import cmd_args, sd_models
    from webui import queue_ray
    from webui.context import WebUIContext

    root = tmp_path_factory.mktemp("ray")
    models = {name: build_tiny_sd(root / "ckpt" / name, seed=seed) for name, seed in (("tiny-a", 0), ("tiny-b", 1))}
    loaded = {name: sd_models.load_model(path, device="cpu") for name, path in models.items()}
    port = free_port()
    args = cmd_args.parse_args(["--precision", "full",
                                "--ckpt", str(models["tiny-a"]), "--ckpt-dir", str(root / "ckpt"), "--api", "--port", str(port), "--outdir-samples", str(root / "out"),
                                "--ui-settings-file", str(root / "config.json")])
    ctx = WebUIContext(args, loaded["tiny-a"])
    local = WebUIContext(args, loaded["tiny-a"])  # the in-process reference: same model, same options
    queue_ray.connect(None, num_cpus=2)
    ctx.backend = queue_ray.RayBackend(ctx, workers=2, models_per_worker=1, max_retries=2, torch_threads=1)
    server = uvicorn.Server(uvicorn.Config(app_module.create_app(ctx, args), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield ctx, local, f"http://127.0.0.1:{port}", loaded
    server.should_exit = True
    thread.join(10)
    ctx.backend.shutdown()
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def in_process(local, req: dict, checkpoint: str | None = None):
    from webui import jobs

    if checkpoint:
        req = {**req, "override_settings": {"sd_model_checkpoint": checkpoint}}
    return jobs.run_job(local, jobs.make_job("txt2img", req, local))


def on_ray(ctx, req: dict, state=None, hooks=(), checkpoint: str | None = None):
    """The job through the Ray back-end, in a thread of its own (a Serve handle refuses to stream in a thread
    with a running asyncio loop, as the main one has once the browser fixture's Playwright started)."""
    from webui import jobs

    if checkpoint:
        req = {**req, "override_settings": {"sd_model_checkpoint": checkpoint}}
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(jobs.run_job, ctx, jobs.make_job("txt2img", req, ctx), state, hooks).result()


def post(url: str, body: dict, timeout: float = 120) -> dict:
    r = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(r, timeout=timeout) as response:
        return json.loads(response.read())


def running_job(ctx, state, timeout: float = 60) -> dict:
    """The replica report of the job of `state` once it has streamed a step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        with ctx.backend._lock:
            worker = next((f.worker for f in ctx.backend._flights.values() if f.state is state and f.worker), None)
        if worker is not None and state.sampling_step >= 2:
            return worker
        time.sleep(0.02)
    raise AssertionError("the job never started on a worker")


def start_page_job(browser, url: str, prompt: str, steps: int, seed: int):
    """A page session (its own browser context) that has pressed Generate on a txt2img job."""
    from types import SimpleNamespace

    from tests.browser import open_page, set_number

    page = open_page(browser, SimpleNamespace(url=url))
    page.fill("#txt2img_prompt textarea", prompt)
    page.fill("#txt2img_neg_prompt textarea", "blue")
    set_number(page, "txt2img_steps", steps)
    page.fill("#txt2img_seed input", str(seed))
    page.click("#txt2img_generate")
    return page


def finish_page_job(page) -> tuple[str, list[str], np.ndarray]:
    """(its infotext, its preview captions, the pixels of its result) once the page says Done."""
    from tests.browser import image_pixels

    page.wait_for_function("/^Done/.test(document.querySelector('#txt2img_progress .sdneg-progress-text')"
                           "?.innerText || '')", timeout=240_000)
    captions = page.locator("#txt2img_preview_gallery .thumbnail-item .caption-label").all_inner_texts()
    page.locator("#txt2img_gallery").scroll_into_view_if_needed()
    assert page.locator("#txt2img_gallery .thumbnail-item").count() == 1
    return page.inner_text("#html_info_txt2img"), captions, image_pixels(page, "#txt2img_gallery .thumbnail-item img")


def test_40_jobs_from_8_api_clients_and_2_page_sessions_are_each_their_owners_and_bit_equal(browser, cluster):
    """The issue's scale test: 2 replicas; 38 API jobs from 8 concurrent clients and one job from each of two
    real browser sessions (the page through Ray), 40 distinct seeds, all at once. Every job completes, each
    image equals the same job run in-process bit for bit, each client gets its own seed's image, and each
    page shows its own job's previews (its own step count) and result."""
    from tests.browser import require_browser

    require_browser()
    ctx, local, url, _ = cluster
    seeds = [1000 + 7 * i for i in range(API_JOBS)]
    page_seeds = (5, 6)
    assert len(set(seeds) | set(page_seeds)) == API_JOBS + len(page_seeds) == 40
    pages = [start_page_job(browser, url, f"page session {i}", steps, seed)
             for i, (steps, seed) in enumerate(zip(PAGE_STEPS, page_seeds))]
    with ThreadPoolExecutor(CLIENTS) as pool:  # 8 clients, each sending its next job when the last is answered
        answers = list(pool.map(lambda s: post(url + "/sdapi/v1/txt2img", request(s, steps=SCALE_STEPS)), seeds))
    results = [finish_page_job(page) for page in pages]
    for seed, answer in zip(seeds, answers):
        info = json.loads(answer["info"])
        assert info["seed"] == seed and info["steps"] == SCALE_STEPS  # nobody got another client's result
        got = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
        assert np.array_equal(pixels(got), pixels(in_process(local, request(seed, steps=SCALE_STEPS)).images[0])), seed
    for i, ((infotext, captions, shown), steps, seed) in enumerate(zip(results, PAGE_STEPS, page_seeds)):
        assert f"page session {i}" in infotext and f"Seed: {seed}," in infotext and f"Steps: {steps}," in infotext
        assert captions == [f"Step {k}/{steps}" for k in range(1, steps + 1)]  # its own previews, each once
        reference = in_process(local, {"infotext": infotext.strip()})
        assert np.array_equal(shown, pixels(reference.images[0]).astype(np.float32)), seed
    for page in pages:
        page.context.close()
    with ctx.backend._lock:
        ran_on = {info["id"] for info in ctx.backend.replicas.values()}
    assert len(ran_on) == 2  # both replicas took jobs
    memory = json.loads(urllib.request.urlopen(url + "/sdapi/v1/memory", timeout=30).read())
    workers = [w for w in memory["workers"] if w["state"] != "dead"]
    assert len(workers) == 2 and all(w["state"] == "idle" and w["checkpoints"] == ["tiny-a"] for w in workers)
    assert {w["device"] for w in workers} == {"cpu"}
    from webui.ui_workers import workers_html

    page = workers_html(ctx.backend)  # the Workers tab
    assert all(f"<td>{w['id']}</td><td>idle</td>" in page for w in workers)


def stopped_like(local, req: dict, stops: list[tuple[int, int]], kind: str = "interrupt"):
    """For each (job_no, step) in `stops`: (it, the job `req` run in-process with `kind` pressed at that step of
    that batch, the (job_no, step, StepInfo) its hooks saw)."""
    from modules.job_state import JobState
    from webui import jobs

    out = []
    for job_no, step in stops:
        state, steps = JobState(), []

        def hook(info, job_no=job_no, step=step, state=state, steps=steps) -> None:
            steps.append((state.job_no, info.step, info))
            if state.job_no == job_no and info.step == step:
                getattr(state, kind)()

        out.append(((job_no, step), jobs.run_job(local, jobs.make_job("txt2img", req, local), state, [hook]), steps))
    return out


def same_images(a, b) -> bool:
    return len(a.images) == len(b.images) and all(np.array_equal(pixels(x), pixels(y)) for x, y in zip(a.images, b.images))


def test_interrupt_returns_the_image_where_it_stopped_on_that_job_only_also_while_it_waits(cluster):
    """As AUTOMATIC1111 and the in-process queue: the interrupted job's image is the last step's prediction
    (bit-equal to the same job interrupted in-process at that step); the other replica's job runs on; a job
    interrupted while it waits for a replica never reaches one and returns no image (in-process: the same)."""
    ctx, local, _, _ = cluster
    from modules.job_state import JobState

    long_steps = 150
    a, b, waiting = JobState(), JobState(), JobState()
    a_steps: list[int] = []
    b_steps: list[int] = []
    with ThreadPoolExecutor(3) as pool:
        fa = pool.submit(on_ray, ctx, request(11, steps=long_steps), a, [lambda info: a_steps.append(info.step)])
        fb = pool.submit(on_ray, ctx, request(12, steps=long_steps), b, [lambda info: b_steps.append(info.step)])
        wa, wb = running_job(ctx, a), running_job(ctx, b)
        assert wa["id"] != wb["id"]
        states = {w["id"]: (w["state"], (w["job"] or {}).get("steps")) for w in ctx.backend.workers()}
        assert states[wa["id"]] == states[wb["id"]] == ("running", long_steps)
        fw = pool.submit(on_ray, ctx, request(13, steps=long_steps), waiting)  # both replicas busy: it waits
        time.sleep(0.3)
        waiting.interrupt()
        a.interrupt()
        stopped_at = a.sampling_step
        pa, pw = fa.result(timeout=60), fw.result(timeout=60)
        assert len(b_steps) < long_steps - 1  # b still running when a and the waiting job were done
        pb = fb.result(timeout=120)
    assert pa.interrupted and len(pa.images) == 1 and a.sampling_step <= stopped_at + 3
    assert a_steps == list(range(len(a_steps))) and len(a_steps) < long_steps
    # the replica stopped inside the step after the last one it streamed (or, rarely, just after that step)
    last = a_steps[-1]
    candidates = stopped_like(local, request(11, steps=long_steps), [(0, last), (0, last + 1)])
    assert any(same_images(pa, ref) and ref.interrupted for _, ref, _ in candidates), last
    assert pw.interrupted and not pw.images and waiting.sampling_step == 0  # never reached a replica
    assert in_process_interrupted_before_start(local, request(13, steps=long_steps)).images == []
    assert not pb.interrupted and len(pb.images) == 1 and b_steps == list(range(long_steps))


def in_process_interrupted_before_start(local, req: dict):
    from modules.job_state import JobState
    from webui import jobs

    state = JobState()
    state.interrupt()
    return jobs.run_job(local, jobs.make_job("txt2img", req, local), state)


def test_skip_ends_the_current_batch_only_as_in_process(cluster):
    """Skip on a Ray job of 2 batches: batch 1 ends where the skip reached it (its image that step's
    prediction), batch 2 runs in full; both images and every streamed preview of batch 2 bit-equal to the
    same job skipped in-process at that step."""
    ctx, local, _, _ = cluster
    from modules.job_state import JobState

    steps = 40
    req = request(41, steps=steps, n_iter=2)
    state, seen = JobState(), []

    def press_skip_at_step_3(info) -> None:
        seen.append((state.job_no, info.step, info))
        if state.job_no == 0 and info.step == 3:
            state.skip()

    processed = on_ray(ctx, req, state, [press_skip_at_step_3])
    first = [s for n, s, _ in seen if n == 0]
    second = [(s, info) for n, s, info in seen if n == 1]
    assert first == list(range(len(first))) and 3 <= first[-1] < steps - 1  # batch 1 cut short
    assert [s for s, _ in second] == list(range(steps))  # batch 2 in full
    assert not processed.interrupted and len(processed.images) == 2 and processed.all_seeds == [41, 42]
    candidates = stopped_like(local, req, [(0, first[-1]), (0, first[-1] + 1)], kind="skip")
    matches = [(ref, ref_steps) for _, ref, ref_steps in candidates if same_images(processed, ref)]
    assert matches, first[-1]
    ref, ref_steps = matches[0]
    ref_second = [info for n, _, info in ref_steps if n == 1]
    assert len(ref_second) == steps
    for (_, mine), theirs in zip(second, ref_second):  # the previews the owner got: the in-process steps
        assert np.array_equal(mine.pred_x0.numpy(), theirs.pred_x0.numpy())
        assert set(mine.branches) == set(theirs.branches)
    full = in_process(local, req)  # and not the unskipped job: batch 1 differs, batch 2 is the same
    assert not np.array_equal(pixels(processed.images[0]), pixels(full.images[0]))
    assert np.array_equal(pixels(processed.images[1]), pixels(full.images[1]))
    import ray

    deadline = time.time() + 10  # the signals of ended jobs are forgotten (the owner's and the replica's calls)
    while ray.get(ctx.backend.signals.size.remote()) and time.time() < deadline:
        time.sleep(0.1)
    assert ray.get(ctx.backend.signals.size.remote()) == 0


def test_checkpoints_run_on_the_replicas_that_hold_them(cluster):
    """models_per_worker=1: after a tiny-b job, one replica holds tiny-b only; jobs go where their model is."""
    ctx, local, _, loaded = cluster
    first = on_ray(ctx, request(21), checkpoint="tiny-b")
    holder = first.worker
    assert np.array_equal(pixels(first.images[0]), pixels(in_process(local, request(21), "tiny-b").images[0]))
    where = {}
    for i, name in enumerate(["tiny-a", "tiny-b", "tiny-a", "tiny-b"]):
        processed = on_ray(ctx, request(30 + i), checkpoint=name)
        where.setdefault(name, set()).add(processed.worker)
        assert processed.sd_model_name == name
    assert where["tiny-b"] == {holder} and holder not in where["tiny-a"] and len(where["tiny-a"]) == 1
    held = {w["id"]: w["checkpoints"] for w in ctx.backend.workers() if w["state"] != "dead"}
    assert held[holder] == ["tiny-b"] and held[next(iter(where["tiny-a"]))] == ["tiny-a"]


REPLACE_WITHIN_S = 120  # a new replica starts a Python process, imports torch and loads the model: on 2 busy cores


def live_replicas(ctx) -> set[str]:
    """The ids of the replicas Serve has running now (the Workers panel's non-dead rows)."""
    return {w["id"] for w in ctx.backend.workers() if w["state"] != "dead"}


def test_sigkill_mid_job_retries_on_the_other_replica_with_the_same_image(cluster):
    """Last of the Ray tests: it kills both replicas (the second on a job's last try)."""
    ctx, local, url, _ = cluster
    from modules.job_state import JobState
    from webui import queue_ray

    state, notes = JobState(), []
    req = request(77, steps=60)
    before = live_replicas(ctx)
    assert len(before) == 2
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(on_ray, ctx, req, state, [lambda info: notes.append(state.textinfo)])
        victim = running_job(ctx, state)
        os.kill(victim["pid"], signal.SIGKILL)
        processed = future.result(timeout=120)
    assert processed.worker != victim["id"] and processed.worker in before
    assert any(queue_ray.RETRY_NOTE in (n or "") for n in notes)
    assert np.array_equal(pixels(processed.images[0]), pixels(in_process(local, req).images[0]))
    # Serve replaces the killed replica: within a bounded wait, 2 replicas run again, one of them new
    deadline = time.time() + REPLACE_WITHIN_S
    while time.time() < deadline and not (len(live_replicas(ctx)) == 2 and ctx.backend.status()["running"] == 2):
        time.sleep(0.25)
    after = live_replicas(ctx)
    assert victim["id"] not in after and len(after) == 2 and ctx.backend.status()["running"] == 2, after
    (new,) = after - before
    assert after - {new} == before - {victim["id"]}
    with ThreadPoolExecutor(2) as pool:  # two jobs at once: one on each replica, the new one too
        both = list(pool.map(lambda seed: on_ray(ctx, request(seed)), (79, 80)))
    assert {p.worker for p in both} == after
    for seed, p in zip((79, 80), both):
        assert np.array_equal(pixels(p.images[0]), pixels(in_process(local, request(seed)).images[0]))
    # a job whose worker dies on its last try fails with a clear message; the server keeps serving
    ctx.backend.max_retries = 0
    try:
        state = JobState()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(on_ray, ctx, request(78, steps=60), state)
            os.kill(running_job(ctx, state)["pid"], signal.SIGKILL)
            with pytest.raises(queue_ray.WorkerLost, match="died"):
                future.result(timeout=120)
    finally:
        ctx.backend.max_retries = 2
    # the server goes on answering (both replicas are now being replaced: no job is sent, to save the wait)
    memory = json.loads(urllib.request.urlopen(url + "/sdapi/v1/memory", timeout=30).read())
    assert victim["id"] in {w["id"] for w in memory["workers"] if w["state"] == "dead"}


def test_unreachable_ray_address_exits_non_zero_and_ray_is_not_imported_without_the_flags():
    port = free_port()
    code = ("import sys; import app; from webui import api, context, jobs; assert 'ray' not in sys.modules; "
            f"app.main(['--nowebui', '--ray-address', '127.0.0.1:{port}'])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode != 0
    assert f"Ray is not reachable at --ray-address 127.0.0.1:{port}" in done.stderr, done.stderr[-2000:]
