"""Loading a single-file SD 1.5 checkpoint against diffusers' from_single_file, and switching with the RAM cache.

    python benchmarks/build_sd15.py /tmp/sd15 --single-file /tmp/sd15-fp16.safetensors   # ~2 GiB, fp16
    python benchmarks/bench_checkpoint_load.py --file /tmp/sd15-fp16.safetensors [--repeats 2] [--cache 2]

1. `sd_models.load_model(file)` (float32 on the CPU) and diffusers'
   `StableDiffusionPipeline.from_single_file(file, config=configs/sd15)` (float32), interleaved, medians;
   then where this engine's time goes (read, key conversion + module build, dtype cast).
2. A switch back and forth between the file and the embedded model with a CheckpointCache of `--cache`
   entries (AUTOMATIC1111's sd_checkpoint_cache): the first visit of each reads its files, a switch
   back copies the cached weights. Loaded with --unet-in-bf16 --clip-in-bf16 (half the RAM per cached copy).
The file is read into the OS page cache before the timed runs: both loaders read it from RAM.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from modules import cmd_args, options, sd_checkpoint_cache, sd_models  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ours(file: Path):
    return sd_models.load_model(file, device="cpu", dtype=torch.float32)


def diffusers_single_file(file: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(file), config=str(REPO / "configs" / "sd15"),
                                                    local_files_only=True, torch_dtype=torch.float32,
                                                    safety_checker=None, requires_safety_checker=False)


def breakdown(file: Path) -> dict[str, float]:
    t_read, sd = timed(lambda: sd_models._read_safetensors(file))
    t_build, parts = timed(lambda: sd_models._load_single_file(file, sd))
    del sd
    _, unet, vae, encoders, *_ = parts
    t_cast, _ = timed(lambda: [m.to(dtype=torch.float32) for m in (unet, vae, *encoders)])
    return {"read safetensors (fp16, whole file)": t_read, "convert keys + build modules (assign)": t_build,
            "cast fp16 -> float32": t_cast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, required=True)
    ap.add_argument("--other", type=Path, default=cmd_args.DEFAULT_MODEL, help="the checkpoint to switch to and back")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", type=int, default=2, help="sd_checkpoint_cache (RAM is shared: keep it small)")
    args = ap.parse_args()
    size = args.file.stat().st_size / 2**30
    # warm-up: imports, tokenizer files and configs for both loaders (the embedded model, small), then
    # A B B A ...: neither loader always goes first
    import diffusers  # noqa: F401
    from diffusers.loaders import single_file_utils  # noqa: F401
    sd_models.load_model(args.other, device="cpu")
    with open(args.file, "rb") as fh:  # the file into the OS page cache, so that no loader's first run reads the disk
        while fh.read(64 << 20):
            pass
    loaders = [(ours, []), (diffusers_single_file, [])]
    for r in range(args.repeats):
        for fn, times in (loaders if r % 2 == 0 else loaders[::-1]):
            t, m = timed(lambda: fn(args.file))
            times.append(t)
            del m
            gc.collect()
    t_ours, t_theirs = loaders[0][1], loaders[1][1]
    mo, md = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"{args.file.name} ({size:.2f} GiB), CPU, float32, {args.repeats} interleaved runs each, medians")
    print(f"sd_models.load_model:                     {mo:6.2f} s")
    print(f"diffusers from_single_file (config=sd15): {md:6.2f} s")
    print(f"ratio ours/diffusers: {mo / md:.3f}")
    print("where load_model's time goes:")
    for what, t in breakdown(args.file).items():
        print(f"  {what:42s} {t:6.2f} s")
    gc.collect()

    kwargs = sd_models.load_kwargs_from_args(cmd_args.parse_args(["--unet-in-bf16", "--clip-in-bf16"]))
    cache = sd_checkpoint_cache.CheckpointCache().configure(options.Options({"sd_checkpoint_cache": args.cache}))
    kwargs["cache"] = cache
    print(f"switching with sd_checkpoint_cache={cache.size} ({kwargs['precision'].describe()}):")
    model = None
    for target in (args.file, args.other, args.file, args.other, args.file):
        hits = cache.hits
        t, model = timed(lambda: sd_models.switch_model(model, target, **kwargs))
        how = "copy from the RAM cache" if cache.hits > hits else "read from disk"
        print(f"  -> {target.name:28s} {t:6.2f} s  ({how}; cache {len(cache)} entries, {cache.nbytes / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
