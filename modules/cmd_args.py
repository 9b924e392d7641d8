"""Command-line flags, named as AUTOMATIC1111 names them."""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CKPT_DIR = REPO / "models" / "Stable-diffusion"
DEFAULT_MODEL = DEFAULT_CKPT_DIR / "tiny-shapes"
SHARED_MAX_JOB_SECONDS = 600.0  # --max-job-seconds of a server others can reach (--listen, --share)
DEFAULT_VAE_DIR = REPO / "models" / "VAE"
DEFAULT_SETTINGS_FILE = REPO / "config.json"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Stable Diffusion web UI that shows what the negative prompt does")
    p.add_argument("--port", type=int, default=None,
                   help="port to serve on (default 7860; 7861 with --nowebui, as AUTOMATIC1111)")
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 instead of 127.0.0.1")
    p.add_argument("--share", action="store_true", help="ask Gradio for a public link")
    p.add_argument("--gradio-auth", default=None, help='UI login: "user:pass[,user2:pass2]"')
    p.add_argument("--gradio-auth-path", type=Path, default=None, help="file of user:pass lines or comma lists")
    p.add_argument("--api", action="store_true", help="serve the /sdapi/v1 API beside the UI")
    p.add_argument("--nowebui", action="store_true", help="serve the API only")
    p.add_argument("--api-auth", default=None, help='HTTP Basic auth for the API: "user:pass[,user2:pass2]"')
    p.add_argument("--api-log", action="store_true", help="log every API request")
    p.add_argument("--max-job-seconds", type=float, default=None,
                   help="refuse jobs estimated to take longer (seconds of UNet work on this server); default: off, "
                        f"{SHARED_MAX_JOB_SECONDS:g} with --listen or --share; 0 turns it off")
    p.add_argument("--api-server-stop", action="store_true",
                   help="enable /sdapi/v1/server-kill, server-restart and server-stop (off by default, as AUTOMATIC1111)")
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint to load at start (default: the embedded model)")
    p.add_argument("--ckpt-dir", type=Path, default=None, help="another folder of checkpoints")
    # settings and VAEs (modules/options.py, modules/sd_vae.py)
    p.add_argument("--ui-settings-file", type=Path, default=DEFAULT_SETTINGS_FILE,
                   help="the settings file, AUTOMATIC1111's config.json (default: config.json in the repository)")
    p.add_argument("--vae-dir", type=Path, default=None, help="another folder of VAE files (besides models/VAE)")
    p.add_argument("--vae-path", type=Path, default=None,
                   help="VAE file to use for every checkpoint; setting it disables the sd_vae setting")
    p.add_argument("--outdir-samples", type=Path, default=REPO / "outputs" / "txt2img-images",
                   help="where generated images are saved")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    # checkpoints and memory (modules/sd_models.load_kwargs_from_args turns these into load_model arguments)
    p.add_argument("--allow-pickle-checkpoints", action="store_true",
                   help="load .ckpt/.pt pickles (with torch.load(weights_only=True)); refused by default")
    p.add_argument("--medvram", action="store_true", help="keep text encoders, UNet and VAE in CPU memory until each runs")
    p.add_argument("--lowvram", action="store_true", help="offload layer by layer to CPU memory (slowest, least memory)")
    p.add_argument("--no-half", action="store_true", help="float32 weights on the GPU (default: fp16)")
    p.add_argument("--no-half-vae", action="store_true", help="float32 VAE even when the rest is fp16")
    p.add_argument("--precision", choices=["full", "autocast", "half"], default="autocast",
                   help="full = float32 everywhere, as --no-half (wins over the bf16 flags); autocast (default): fp16 on "
                        "the GPU; on the CPU bfloat16 UNet and text encoder where the CPU has bfloat16 instructions "
                        "(AVX512-BF16, AMX), else float32")
    # speed (modules/sd_precision.py): Forge's per-component dtype flags, AUTOMATIC1111's --opt-channelslast
    p.add_argument("--unet-in-bf16", action="store_true", help="bfloat16 UNet (the sampler stays float32)")
    p.add_argument("--clip-in-bf16", action="store_true", help="bfloat16 text encoder")
    p.add_argument("--vae-in-bf16", action="store_true", help="bfloat16 VAE")
    p.add_argument("--opt-channelslast", action="store_true", help="channels-last memory format for the UNet and VAE")
    p.add_argument("--attention", choices=["sdpa", "classic"], default="sdpa",
                   help="attention kernel: sdpa (torch's scaled_dot_product_attention, default) or classic")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (compiled once per image shape, reused by later jobs; needs a C++ "
                        "compiler on the CPU)")
    # embeddings, styles, LoRA (modules/textual_inversion.py, modules/styles.py, modules/extra_networks_lora.py)
    p.add_argument("--embeddings-dir", type=Path, default=REPO / "embeddings",
                   help="textual-inversion embeddings folder (subfolders too; default: embeddings/)")
    p.add_argument("--styles-file", action="append", default=[],
                   help="a styles CSV (name,prompt,negative_prompt) or a wildcard; repeat for several "
                        "(default: styles.csv); new styles are saved to the first")
    p.add_argument("--lora-dir", type=Path, default=REPO / "models" / "Lora", help="LoRA folder (default: models/Lora)")
    # -- Ray Serve workers (webui/queue_ray.py); without these flags Ray is never imported
    p.add_argument("--workers", type=int, default=None, help="run jobs on N Ray Serve replicas (a local Ray instance)")
    p.add_argument("--ray-address", default=None, help="join the Ray cluster at ADDRESS (host:port, ray://host:port)")
    p.add_argument("--min-workers", type=int, default=None, help="autoscale the replicas from this many (with --max-workers)")
    p.add_argument("--max-workers", type=int, default=None, help="autoscale the replicas up to this many")
    p.add_argument("--models-per-worker", type=int, default=2, help="checkpoints a replica keeps loaded (LRU)")
    p.add_argument("--worker-retries", type=int, default=2, help="how often a job whose replica died runs again")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if not args.styles_file:
        args.styles_file = [str(REPO / "styles.csv")]
    if args.port is None:
        args.port = 7861 if args.nowebui else 7860
    if args.max_job_seconds is None and (args.listen or args.share):
        args.max_job_seconds = SHARED_MAX_JOB_SECONDS
    if not 0 < args.port < 65536:
        raise SystemExit(f"--port must be between 1 and 65535, got {args.port}")
    for flag in ("workers", "min_workers", "max_workers", "models_per_worker"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    return args


def parse_auth(text: str | None, path: Path | None = None) -> list[tuple[str, str]]:
    """"u:p,u2:p2" (and lines of a file) -> [(u, p), (u2, p2)]."""
    items = [x for x in (text or "").split(",") if x.strip()]
    if path is not None:
        items += [x for line in Path(path).read_text().splitlines() for x in line.split(",") if x.strip()]
    pairs = []
    for item in items:
        user, sep, password = item.strip().partition(":")
        if not sep:
            raise SystemExit(f"auth entry {item!r} is not user:pass")
        pairs.append((user, password))
    return pairs
