"""Take the README's screenshots of the txt2img page after a run: docs/ui.png and docs/inspector.png.

    python scripts/screenshots.py [--ckpt DIR] [--out docs/ui.png] [--inspector-out docs/inspector.png]

Starts the real server (`python app.py`) on a free loopback port with the given model
(default: the embedded one; the tests' tiny random model if that is missing), drives
Debian's Chromium with Playwright through one generation with a negative prompt and the
"All three" preview, and saves the page; then moves the trajectory inspector to
`--inspector-step` (decoded with `--inspector-method`, Full VAE by default) and saves the
inspector alone. Both are reduced to 256-colour PNGs to
keep the repository small. Offline, like everything else here.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from PIL import Image  # noqa: E402

from modules import cmd_args  # noqa: E402
from tests.server import start_server  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "ui.png")
    ap.add_argument("--inspector-out", type=Path, default=REPO / "docs" / "inspector.png")
    ap.add_argument("--inspector-step", type=int, default=3, help="the step the inspector shows")
    ap.add_argument("--inspector-method", default="Full", choices=["Approx cheap", "Full"],
                    help="how the inspector decodes latents (the page's preview method, set after the run)")
    ap.add_argument("--prompt", default="a circle on a white background")
    ap.add_argument("--negative", default="red")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1239)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="screenshots-"))
    ckpt = args.ckpt or cmd_args.DEFAULT_MODEL
    if not (Path(ckpt) / "model_index.json").is_file():
        from tests.tiny_sd import build_tiny_sd

        print(f"{ckpt} is not there: using the tests' tiny random model (its pictures are noise)")
        ckpt = build_tiny_sd(work / "tiny-sd")
    server = start_server(ckpt, "--outdir-samples", str(work / "outputs"))
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(180_000)
            page.goto(server.url + "/")
            page.wait_for_selector("#txt2img_prompt textarea")
            page.fill("#txt2img_prompt textarea", args.prompt)
            page.fill("#txt2img_neg_prompt textarea", args.negative)
            for elem_id, value in (("txt2img_steps", args.steps),):
                box = page.locator(f"#{elem_id} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            page.fill("#txt2img_seed input", str(args.seed))
            page.get_by_label("All three").check()
            page.click("#txt2img_generate")
            page.wait_for_function("/^Done/.test(document.querySelector('#txt2img_progress').innerText)")
            page.locator("#txt2img_inspector_plot").scroll_into_view_if_needed()  # pictures load lazily, when in view
            page.wait_for_timeout(1000)  # let the thumbnails load
            page.evaluate("window.scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            raw = work / "page.png"
            page.screenshot(path=str(raw), full_page=True)
            shots = [(raw, args.out)]
            if args.inspector_out:
                step = max(1, min(args.inspector_step, args.steps))
                page.locator("#txt2img_preview_method").get_by_label(args.inspector_method, exact=True).check()
                box = page.locator("#txt2img_inspector_step input[type=number]")
                box.fill(str(step))
                box.press("Enter")
                page.wait_for_function("s => document.querySelector('#txt2img_inspector_info').innerText"
                                       ".startsWith(`Step ${s}/`)", arg=step)
                page.wait_for_timeout(1000)  # let the pictures load
                raw_inspector = work / "inspector.png"
                page.locator("#txt2img_inspector").screenshot(path=str(raw_inspector))
                shots.append((raw_inspector, args.inspector_out))
            browser.close()
        for source, out in shots:
            out.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(source) as im:
                im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
            print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
