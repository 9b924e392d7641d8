"""Start the real server (`python app.py ...`) as a subprocess for tests that talk HTTP to it.

    with running_server(model_dir, "--api") as server:
        requests.get(server.url + "/sdapi/v1/samplers")

`start_server` picks a free loopback port, sets HF_HUB_OFFLINE=1, waits until the server
answers any HTTP request, and returns a `Server`; `server.stop()` ends it (the process
only). Its stdout and stderr go to a log file, readable with `server.output()`.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log_path: Path):
        self.proc, self.port, self.log_path = proc, port, log_path
        self.url = f"http://127.0.0.1:{port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def answers(self) -> bool:
        try:
            urllib.request.urlopen(self.url + "/", timeout=2).close()
            return True
        except urllib.error.HTTPError:  # 401, 404, ...: it is serving
            return True
        except (OSError, ValueError):
            return False

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)


def start_server(ckpt: str | Path, *flags: str, port: int | None = None, timeout: float = 180,
                 env: dict | None = None) -> Server:
    """`python app.py --ckpt CKPT --port PORT FLAGS...`, returned once it answers HTTP.

    With no `port`, a free one; if another process (a parallel test worker) takes it before the
    server binds it, once more with another."""
    if port is None:
        try:
            return _start(ckpt, flags, free_port(), timeout, env)
        except _PortTaken:
            return _start(ckpt, flags, free_port(), timeout, env)
    return _start(ckpt, flags, port, timeout, env)


class _PortTaken(RuntimeError):
    pass


def _start(ckpt, flags, port: int, timeout: float, env: dict | None) -> Server:
    log = Path(tempfile.mkstemp(prefix=f"server-{port}-", suffix=".log")[1])
    if not {"--precision", "--no-half", "--unet-in-bf16", "--clip-in-bf16", "--vae-in-bf16"} & set(flags):
        # float32, as the in-process models the tests compare with: the default is bfloat16 on a CPU that has it
        flags = (*flags, "--precision", "full")
    if "--ui-settings-file" not in flags:  # a test server never writes the repo's config.json
        flags = (*flags, "--ui-settings-file", str(log.with_suffix(".config.json")))
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                   "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(REPO / "app.py"), "--ckpt", str(ckpt), "--port", str(port),
                                 *flags], cwd=REPO, env=environment, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = Server(proc, port, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out = server.output()
            error = _PortTaken if "address already in use" in out.lower() else RuntimeError
            raise error(f"server exited with {proc.returncode}:\n{out[-4000:]}")
        if server.answers():
            return server
        time.sleep(0.25)
    server.stop()
    raise TimeoutError(f"server did not answer within {timeout}s:\n{server.output()[-4000:]}")


@contextlib.contextmanager
def running_server(ckpt: str | Path, *flags: str, **kw):
    server = start_server(ckpt, *flags, **kw)
    try:
        yield server
    finally:
        server.stop()
