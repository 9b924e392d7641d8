"""The Ray Serve back-end against the in-process queue, in one run, on loopback.

    python benchmarks/bench_ray.py [--model DIR] [--jobs 12] [--steps 20] [--repeats 9]

Prints, for the same model and jobs:
- the added latency per job: median wall time of a 1-step job through Ray (1 replica) minus in-process;
- the added latency per streamed step: the per-step slope (a 1-step and a `--long`-step job) through
  Ray minus the in-process slope (each step's StepInfo travels to the owner on Serve's stream);
- jobs per minute with 1 and 2 replicas (`--jobs` jobs of `--steps` steps sent at once), and in-process.
Runs are interleaved (in-process, Ray, ...) and medians compared, so machine load hits both alike.
Each replica uses one torch thread, as does this process: 2 replicas on a 2-core machine can at best double.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from modules import cmd_args, sd_models  # noqa: E402
from tests.tiny_sd import build_tiny_sd  # noqa: E402
from webui import jobs  # noqa: E402
from webui.context import WebUIContext  # noqa: E402


def request(seed: int, steps: int) -> dict:
    return {"prompt": "a red circle", "negative_prompt": "blue", "steps": steps, "seed": seed, "width": 64,
            "height": 64, "sampler_name": "DDIM"}


def timed(ctx, steps: int, seed: int = 1) -> float:
    t = time.perf_counter()
    jobs.run_job(ctx, jobs.make_job("txt2img", request(seed, steps), ctx))
    return time.perf_counter() - t


def jobs_per_minute(ctx, n: int, steps: int, threads: int) -> float:
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: timed(ctx, steps, seed=100 + i), range(n)))
    return 60 * n / (time.perf_counter() - t)


def serve_floor(n: int) -> float:
    """Median wall time of a streamed request to a trivial deployment: what any Serve call costs on this machine."""
    from ray import serve

    @serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0})
    class Echo:
        async def run(self, x):
            yield ("started", x)
            yield ("done", x)

    handle = serve.run(Echo.bind(), name="bench-echo", route_prefix=None)

    def once() -> float:
        t = time.perf_counter()
        list(handle.options(stream=True).run.remote(1))
        return time.perf_counter() - t

    for _ in range(10):
        once()
    floor = statistics.median(once() for _ in range(n))
    serve.delete("bench-echo")
    return floor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder (default: a tiny random SD)")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--long", type=int, default=41, help="steps of the long job for the per-step slope")
    ap.add_argument("--repeats", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(1)
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    model_dir = a.model or build_tiny_sd(tmp / "bench-ray")
    args = cmd_args.parse_args(["--ckpt", str(model_dir), "--outdir-samples", str(tmp / "out"),
                                "--ui-settings-file", str(tmp / "config.json")])
    model = sd_models.load_model(model_dir, device="cpu")
    local, remote = WebUIContext(args, model), WebUIContext(args, model)

    from webui import queue_ray

    t = time.perf_counter()
    queue_ray.connect(None, num_cpus=2)
    remote.backend = queue_ray.RayBackend(remote, workers=1, torch_threads=1)
    print(f"Ray and 1 replica up in {time.perf_counter() - t:.1f} s")
    floor = serve_floor(a.repeats * 4)
    print(f"Ray Serve's own floor here: {floor * 1e3:.1f} ms per streamed request of 2 items (a trivial deployment)")
    for ctx in (local, remote):  # warm-up
        timed(ctx, 1), timed(ctx, a.long)
    short = {"in-process": [], "ray": []}
    long = {"in-process": [], "ray": []}
    for _ in range(a.repeats):
        for name, ctx in (("in-process", local), ("ray", remote)):
            short[name].append(timed(ctx, 1))
            long[name].append(timed(ctx, a.long))
    med = {k: statistics.median(v) for k, v in short.items()}
    slope = {k: (statistics.median(long[k]) - med[k]) / (a.long - 1) for k in long}
    print(f"1-step job: in-process {med['in-process'] * 1e3:.1f} ms, Ray {med['ray'] * 1e3:.1f} ms -> "
          f"added per job {(med['ray'] - med['in-process']) * 1e3:.1f} ms (target < 20 ms)")
    print(f"per step: in-process {slope['in-process'] * 1e3:.2f} ms, Ray {slope['ray'] * 1e3:.2f} ms -> "
          f"added per streamed step {(slope['ray'] - slope['in-process']) * 1e3:.2f} ms (target < 2 ms)")

    rates = {"in-process": jobs_per_minute(local, a.jobs, a.steps, threads=a.jobs),
             "Ray, 1 replica": jobs_per_minute(remote, a.jobs, a.steps, threads=a.jobs)}
    t = time.perf_counter()
    remote.backend = queue_ray.RayBackend(remote, workers=2, torch_threads=1)
    print(f"2nd replica up in {time.perf_counter() - t:.1f} s")
    jobs_per_minute(remote, 4, 1, threads=4)  # both replicas warm
    rates["Ray, 2 replicas"] = jobs_per_minute(remote, a.jobs, a.steps, threads=a.jobs)
    for name, rate in rates.items():
        print(f"{name:>16}: {rate:7.1f} jobs/min ({a.jobs} jobs of {a.steps} steps, x{rate / rates['in-process']:.2f}"
              f" of in-process)")
    print(f"CPU cores: {os.cpu_count()} (with 2 replicas each uses one torch thread)")
    remote.backend.shutdown()


if __name__ == "__main__":
    main()
