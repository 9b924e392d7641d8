"""Make the README's X/Y/Z plot picture: docs/xyz_grid.png, CFG scale x negative prompt.

    python scripts/xyz_example.py [--ckpt DIR] [--out docs/xyz_grid.png] [--scale 3]

Runs the X/Y/Z plot engine (modules/scripts/xyz_grid.py, the same code the Script dropdown
and `script_name: "x/y/z plot"` run) on the embedded model (the tests' tiny random model if
that is missing) and saves the grid. The embedded model makes 64x64 images, so the cells are
enlarged `--scale` times (nearest neighbour) and the grid is drawn again from them with
the same labels, to be readable on a page. Offline, CPU is enough.
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

from modules import cmd_args, processing, sd_models  # noqa: E402
from modules.scripts import xyz_grid  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "xyz_grid.png")
    ap.add_argument("--prompt", default="a red circle on a white background")
    ap.add_argument("--x-type", default="Negative prompt")
    ap.add_argument("--x-values", default='"", red, blue')
    ap.add_argument("--y-type", default="CFG Scale")
    ap.add_argument("--y-values", default="3, 7")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--scale", type=int, default=3, help="enlarge each cell this many times (nearest neighbour)")
    args = ap.parse_args()
    ckpt = args.ckpt or cmd_args.DEFAULT_MODEL
    if not (Path(ckpt) / "model_index.json").is_file():
        from tests.tiny_sd import build_tiny_sd

        print(f"{ckpt} is not there: using the tests' tiny random model (its pictures are noise)")
        ckpt = build_tiny_sd(Path(tempfile.mkdtemp(prefix="xyz-example-")) / "tiny-sd")
    model = sd_models.load_model(ckpt)
    size = model.default_size
    p = processing.StableDiffusionProcessingTxt2Img(
        prompt=args.prompt, steps=args.steps, sampler_name="DDIM", seed=args.seed, width=size, height=size,
        do_not_save_samples=True)
    plot = xyz_grid.run_xyz(model, p, xyz_grid.XYZArgs(
        x_type=args.x_type, x_values=args.x_values, y_type=args.y_type, y_values=args.y_values,
        include_lone_images=True), save_grid=False)
    cells = plot.images[plot.grid_count:]
    if args.scale > 1:
        cells = [c.resize((c.width * args.scale, c.height * args.scale), Image.NEAREST) for c in cells]
    grid, _ = xyz_grid.draw_grid(cells, len(plot.x_labels), len(plot.y_labels), plot.x_labels, plot.y_labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", plot.infotexts[0])
    grid.save(args.out, pnginfo=info, optimize=True)
    print(f"{args.out}: {grid.width}x{grid.height}, model {Path(ckpt).name}; x: {plot.x_labels}; y: {plot.y_labels}")


if __name__ == "__main__":
    main()
