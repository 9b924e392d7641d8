"""What step previews cost: process_images with no preview, with "Approx cheap" and with "Full" (VAE),
interleaved, on the same model, prompts and seeds; prints the median time per step of each, the
overhead per step against no preview, the time the hook takes on the sampling thread, and the
time per picture on the reading thread (which, as in the UI, polls `frames()` every 0.25 s
while the job runs).

    python benchmarks/bench_previews.py [--model DIR] [--steps 20] [--batch-size 1] [--repeats 5]
                                        [--subject "All three"]

Without --model it builds the tiny random model of the tests (64x64 images, 8x8 latents).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from modules import processing, sd_models  # noqa: E402
from webui import previews  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--subject", default=previews.SUBJECT_COMBINED, choices=previews.SUBJECTS)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.model is None:
        from tests.tiny_sd import build_tiny_sd

        args.model = build_tiny_sd(Path(tempfile.mkdtemp()) / "tiny-sd")
    model = sd_models.load_model(args.model, device=args.device)
    size = model.default_size

    def job(hooks):
        stop = threading.Event()

        def reader():  # the UI's streaming loop
            while not stop.wait(0.25):
                for h in hooks:
                    h.frames()

        p = processing.StableDiffusionProcessingTxt2Img(
            prompt="a red circle on a white background", negative_prompt="blue", steps=args.steps, cfg_scale=7,
            seed=1234, width=size, height=size, batch_size=args.batch_size, do_not_save_samples=True)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        thread = threading.Thread(target=reader)
        thread.start()
        start = time.perf_counter()
        processing.process_images(model, p, hooks=hooks)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start) / args.steps
        stop.set()
        thread.join()
        for h in hooks:
            h.frames()
        return elapsed

    variants = {"none": lambda: [],
                "cheap": lambda: [previews.PreviewCollector(model, args.subject, previews.METHOD_CHEAP, (size, size))],
                "full": lambda: [previews.PreviewCollector(model, args.subject, previews.METHOD_FULL, (size, size))]}
    job([])  # warm-up
    times: dict[str, list[float]] = {k: [] for k in variants}
    hook_times: dict[str, list[float]] = {k: [] for k in variants}
    render_times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, make in variants.items():
            hooks = make()
            times[name].append(job(hooks))
            hook_times[name].append(hooks[0].seconds / args.steps if hooks else 0.0)
            render_times[name].append(hooks[0].render_seconds / args.steps if hooks else 0.0)
    base = statistics.median(times["none"])
    print(f"model {model.name} {size}x{size}, batch {args.batch_size}, {args.steps} steps, subject {args.subject!r}, "
          f"device {model.device}, {args.repeats} interleaved repeats")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:>5}: {1000 * med:8.2f} ms/step  overhead {1000 * (med - base):+7.2f} ms/step "
              f"({100 * (med / base - 1):+5.1f}%), hook {1000 * statistics.median(hook_times[name]):6.3f} ms/step, "
              f"picture {1000 * statistics.median(render_times[name]):7.2f} ms/step (reader thread)")


if __name__ == "__main__":
    main()
