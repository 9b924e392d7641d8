"""What step previews cost, and how much they look like the result.

Cost (the default): process_images with no preview, with "Approx cheap", with TAESD (when a
decoder is in models/VAE-approx) and with "Full" (VAE), interleaved, on the same model, prompts
and seeds; prints the median time per step of each, the overhead per step against no preview,
the time the hook takes on the sampling thread, and the time per picture on the reading thread
(which, as in the UI, polls `frames()` every 0.25 s while the job runs). Then the bare cost of
one `latents_to_rgb` call on the batch's latents per method, the old linear map included.

    python benchmarks/bench_previews.py [--model DIR] [--steps 20] [--batch-size 1] [--repeats 5]
                                        [--subject "All three"]

Without --model it builds the tiny random model of the tests (64x64 images, 8x8 latents).

Quality (`--quality`): on the embedded model (or --model), DDIM 20 steps, CFG 7, `--seeds` seeds
(seed i with prompt i*7 mod 45 of training/evaluate.py's 45 fully specified prompts, so every
colour, shape and background comes up), the preview of step `--early-step` and of the last
step against the VAE's decode of the same pred_x0: mean |difference| per 8-bit channel at image
resolution (the preview upscaled bilinearly), for "cheap" as it is now (the model's preview
decoder when it has one), the linear map it replaced, and TAESD when available. Target: at most
12 levels at the last step.

    python benchmarks/bench_previews.py --quality [--model DIR] [--seeds 20] [--early-step 5] [--json FILE]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from modules import processing, sd_models, sd_vae_approx  # noqa: E402
from webui import previews  # noqa: E402

EMBEDDED = REPO / "models" / "Stable-diffusion" / "tiny-shapes"
COLORS = ("red", "green", "blue", "yellow", "purple")  # training/shapes.py's order, as training/evaluate.py
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black", "gray")
FULL_PROMPTS = [f"a {c} {s} on a {b} background" for c in COLORS for s in SHAPES for b in BACKGROUNDS]


def linear_only(model):
    """The same model with "cheap" forced to the linear latent_rgb map (what "cheap" was before the decoder)."""
    m = copy.copy(model)
    m.__dict__["preview_decoder"] = None
    return m


def levels(preview: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean |preview - reference| per 8-bit channel, per image; the preview upscaled bilinearly to the
    reference's size first. Both in [-1, 1], quantised as the preview's PNG would be."""
    if preview.shape[-2:] != reference.shape[-2:]:
        preview = torch.nn.functional.interpolate(preview.float(), size=reference.shape[-2:], mode="bilinear",
                                                  align_corners=False)
    q = lambda x: ((x.float().clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    return (q(preview) - q(reference)).abs().flatten(1).mean(1)


def prompt_for_seed(seed: int) -> str:
    return FULL_PROMPTS[(seed * 7) % len(FULL_PROMPTS)]


def quality_latents(model, seeds: list[int], steps: int = 20, record: tuple[int, ...] = ()) -> dict[int, torch.Tensor]:
    """{step (1-based): (len(seeds), C, h, w) guided pred_x0 of that step}, DDIM `steps` steps, CFG 7."""
    kept: dict[int, list[torch.Tensor]] = {s: [] for s in record}

    def hook(info):
        if info.step + 1 in kept:
            kept[info.step + 1].append(info.pred_x0.detach().float().cpu())

    for seed in seeds:
        p = processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt_for_seed(seed), steps=steps, cfg_scale=7, sampler_name="DDIM", seed=seed,
            width=model.default_size, height=model.default_size, do_not_save_samples=True)
        processing.process_images(model, p, hooks=[hook])
    return {s: torch.cat(v) for s, v in kept.items()}


def quality(model, seeds: list[int], steps: int, early: int) -> dict:
    """Mean 8-bit difference from the VAE decode at the early and the last step, per method."""
    lat = quality_latents(model, seeds, steps, (early, steps))
    methods = {"cheap": lambda x: sd_vae_approx.latents_to_rgb(model, x, "cheap"),
               "linear map (before)": lambda x: sd_vae_approx.latents_to_rgb(linear_only(model), x, "cheap")}
    if sd_vae_approx.METHOD_TAESD in sd_vae_approx.available_methods(model):
        methods["taesd"] = lambda x: sd_vae_approx.latents_to_rgb(model, x, "taesd")
    res: dict = {"seeds": seeds, "steps": steps, "prompts": [prompt_for_seed(s) for s in seeds],
                 "cheap_is": sd_vae_approx.cheap_kind(model), "levels": {}}
    for step, x in lat.items():
        full = sd_vae_approx.latents_to_rgb(model, x, "full")
        for name, fn in methods.items():
            d = levels(fn(x), full)
            res["levels"].setdefault(name, {})[f"step {step}"] = dict(mean=round(float(d.mean()), 2),
                                                                      max=round(float(d.max()), 2))
    return res


def render_costs(model, latents: torch.Tensor, repeats: int = 50) -> dict[str, float]:
    """Median ms of one latents_to_rgb call on `latents` per method (the picture's cost, before PIL)."""
    variants = {"cheap": (model, "cheap"), "linear map": (linear_only(model), "cheap"), "full": (model, "full")}
    if sd_vae_approx.METHOD_TAESD in sd_vae_approx.available_methods(model):
        variants["taesd"] = (model, "taesd")
    out = {}
    for name, (m, method) in variants.items():
        sd_vae_approx.latents_to_rgb(m, latents, method)  # warm-up (and loading)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sd_vae_approx.latents_to_rgb(m, latents, method)
            times.append(time.perf_counter() - t0)
        out[name] = 1000 * statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--subject", default=previews.SUBJECT_COMBINED, choices=previews.SUBJECTS)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quality", action="store_true", help="preview vs VAE decode, in 8-bit levels (see above)")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--early-step", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="--quality: also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    if args.quality:
        model = sd_models.load_model(args.model or EMBEDDED, device=args.device)
        t0 = time.time()
        res = quality(model, list(range(args.seeds)), args.steps, args.early_step)
        res["seconds"] = round(time.time() - t0, 1)
        print(f"model {model.name}, DDIM {args.steps} steps, CFG 7, {args.seeds} seeds (prompts from the 45 full "
              f"prompts), preview vs VAE decode of the same pred_x0, mean |diff| per 8-bit channel "
              f"(mean over seeds / worst seed); cheap = {res['cheap_is']}")
        for name, per_step in res["levels"].items():
            cells = "   ".join(f"{k}: {v['mean']:6.2f} (worst {v['max']:6.2f})" for k, v in per_step.items())
            print(f"{name:>20}: {cells}")
        last = res["levels"]["cheap"][f"step {args.steps}"]["mean"]
        print(f"target <= 12 levels at the last step: {'met' if last <= 12 else 'NOT met'} ({last:.2f})")
        if args.json:
            args.json.write_text(json.dumps(res, indent=1) + "\n")
        return
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
          f"device {model.device}, {args.repeats} interleaved repeats; cheap = {sd_vae_approx.cheap_kind(model)}")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:>5}: {1000 * med:8.2f} ms/step  overhead {1000 * (med - base):+7.2f} ms/step "
              f"({100 * (med / base - 1):+5.1f}%), hook {1000 * statistics.median(hook_times[name]):6.3f} ms/step, "
              f"picture {1000 * statistics.median(render_times[name]):7.2f} ms/step (reader thread)")
    shape = (args.batch_size * (3 if args.subject == previews.SUBJECT_ALL else 1), model.latent_channels,
             size // model.vae_scale_factor, size // model.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(model.device, model.dtype)
    costs = render_costs(model, latents)
    print(f"latents_to_rgb on one step's {shape[0]} latent(s), median ms per step: "
          + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))


if __name__ == "__main__":
    main()
