"""With auth on, no client sees another user's work: progress, interrupt, and Gradio's files.

One server with --api-auth and --gradio-auth; a page user (logged in, in Chromium) and two
API users. Their jobs share one queue, but /progress shows a job's preview and prompt only
to its owner, /interrupt stops only the caller's own job, and the page's files live in a
folder of this server's own (mode 0700) from which nothing else is served.
"""
from __future__ import annotations

import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.browser import require_browser, set_number

API_USERS = {"alice": "a-secret", "bob": "b-secret"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    from tests.server import start_server
    from tests.tiny_sd import build_tiny_sd

    root = tmp_path_factory.mktemp("isolation")
    model = build_tiny_sd(root / "models" / "tiny-sd")
    auth = ",".join(f"{u}:{p}" for u, p in API_USERS.items())
    srv = start_server(model, "--api", "--api-auth", auth, "--gradio-auth", "page:page-secret",
                       "--outdir-samples", str(root / "outputs"))
    yield srv
    srv.stop()


def api(server, user, method, route, **kw):
    return requests.request(method, f"{server.url}/sdapi/v1/{route}", auth=(user, API_USERS[user]), timeout=120, **kw)


LONG = {"prompt": "a long job", "negative_prompt": "red", "steps": 150, "batch_size": 8, "n_iter": 20, "width": 64,
        "height": 64, "sampler_name": "DDIM", "seed": 1}


def wait_running(server, user, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = api(server, user, "GET", "progress").json()
        if body["state"]["job"]:
            return body
        time.sleep(0.2)
    raise TimeoutError("no job started")


def test_progress_and_interrupt_are_the_owners_only(server):
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=api(server, "alice", "POST", "txt2img", json=LONG)))
    worker.start()
    try:
        mine = wait_running(server, "alice")
        deadline = time.monotonic() + 30
        while mine["current_image"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
            mine = api(server, "alice", "GET", "progress").json()
        assert mine["current_image"] and mine["state"]["job"] == "txt2img"
        for _ in range(5):  # bob sees a busy server, nothing of alice's job
            theirs = api(server, "bob", "GET", "progress").json()
            assert theirs["current_image"] is None and theirs["state"]["job"] == "busy"
            assert theirs["state"]["sampling_steps"] == 0 and "long job" not in str(theirs)
        api(server, "bob", "POST", "interrupt")
        time.sleep(1.0)
        assert api(server, "alice", "GET", "progress").json()["state"]["interrupted"] is False
        api(server, "alice", "POST", "interrupt")
        worker.join(60)
        assert not worker.is_alive() and result["r"].status_code == 200
    finally:
        api(server, "alice", "POST", "interrupt")
        worker.join(60)


def login(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.fill("input[type=text]", "page")
    page.fill("input[type=password]", "page-secret")
    page.keyboard.press("Enter")
    page.wait_for_selector("#txt2img_prompt textarea")
    return page


def test_a_page_users_job_is_busy_to_api_callers_and_its_files_are_private(browser, server):
    page = login(browser, server)
    page.fill("#txt2img_prompt textarea", "a page user's secret prompt")
    set_number(page, "txt2img_steps", 150)
    set_number(page, "txt2img_batch_size", 8)
    set_number(page, "txt2img_batch_count", 20)
    page.click("#txt2img_generate")
    page.wait_for_function("document.querySelectorAll('#txt2img_preview_gallery img').length >= 2")
    for _ in range(5):
        body = api(server, "alice", "GET", "progress").json()
        assert body["current_image"] is None and body["state"]["job"] == "busy"
        assert "secret prompt" not in str(body)
        time.sleep(0.2)
    src = page.evaluate("document.querySelector('#txt2img_preview_gallery img').src")
    path = Path(re.search(r"file=([^?&]+)", requests.utils.unquote(src)).group(1))
    folder = next(p for p in path.parents if p.name.startswith("gradio-"))
    assert folder.parent.name == "cache" and stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    cookies = {c["name"]: c["value"] for c in page.context.cookies()}
    assert requests.get(src, cookies=cookies, timeout=10).status_code == 200  # the user's own preview
    # a file this server never wrote, in the machine-wide folder Gradio would otherwise use
    shared = Path("/tmp/gradio") / "planted-by-another-process.txt"
    shared.parent.mkdir(exist_ok=True)
    shared.write_text("not the server's")
    try:
        url = f"{server.url}/gradio_api/file={shared}"
        assert requests.get(url, cookies=cookies, timeout=10).status_code in (403, 404)
    finally:
        shared.unlink()
    page.click("#txt2img_interrupt")
    page.wait_for_function("/^Interrupted/.test(document.querySelector('#txt2img_progress').innerText)")
    page.context.close()


def test_without_credentials_nothing_answers(server):
    r = requests.get(f"{server.url}/sdapi/v1/progress", timeout=10)
    assert r.status_code == 401
