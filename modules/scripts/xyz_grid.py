"""The X/Y/Z plot: one txt2img job per combination of axis values, assembled into a labelled grid.

This is AUTOMATIC1111's `scripts/xyz_grid.py` as its users know it (axis names, value syntax,
labels, grid layout, "Draw legend", "Include Sub Images"), on this project's engine, with
the axes that matter for negative prompts: Negative prompt (a list of whole negative
prompts), Guidance rule, Negative weight, Negative start. Nothing here imports Gradio.

    plot = run_xyz(model, p, XYZArgs(x_type="CFG Scale", x_values="3, 7",
                                     y_type="Negative prompt", y_values='"", red, blue'))
    plot.images[0]        # the grid; then the cells (unless include_lone_images is off)
    plot.x_labels, plot.y_labels, plot.layout

Value syntax (AUTOMATIC1111's): values are comma separated with CSV quoting (`"a, b", c` is
two values); number axes also take ranges: `1-5` (1,2,3,4,5), `1-5 (+2)` (1,3,5),
`1-10 [4]` (4 values evenly spaced from 1 to 10), floats alike (`0-1 (+0.25)`).
Prompt S/R: the first value is searched in the prompt and the negative prompt and
replaced by each value in turn (so the first cell is the job as written).

The seed is resolved once before the cells run (-1 becomes one random seed for all cells),
so the cells differ only by their axis values, as in AUTOMATIC1111.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import math
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache
from io import StringIO
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from modules import images as images_module
from modules import processing, sd_guidance, sd_samplers
from modules.errors import InvalidParameter, UserError
from modules.job_state import JobState
from modules.processing import Processed, StableDiffusionProcessingTxt2Img

MAX_CELLS = 512  # a bigger plot is almost certainly a typo in a range; refused before anything runs


# ---- value parsing ---------------------------------------------------------------------------------

# Each space between the parts is read by exactly one `\s*`, so a failed match backtracks in
# linear time (A1111's patterns, `\s*[+-]?\s*\d+` and `(?:\s*\(...\))?\s*`, try every split of
# a run of spaces between two `\s*`: seconds for a value with a few thousand spaces).
re_range = re.compile(r"\s*((?:[+-]\s*)?\d+)\s*-\s*((?:[+-]\s*)?\d+)\s*(?:\(([+-]\d+)\s*\)\s*)?")
re_range_float = re.compile(
    r"\s*((?:[+-]\s*)?\d+(?:\.\d*)?)\s*-\s*((?:[+-]\s*)?\d+(?:\.\d*)?)\s*(?:\(([+-]\d+(?:\.\d*)?)\s*\)\s*)?")
re_range_count = re.compile(r"\s*((?:[+-]\s*)?\d+)\s*-\s*((?:[+-]\s*)?\d+)\s*(?:\[(\d+)\s*]\s*)?")
re_range_count_float = re.compile(
    r"\s*((?:[+-]\s*)?\d+(?:\.\d*)?)\s*-\s*((?:[+-]\s*)?\d+(?:\.\d*)?)\s*(?:\[(\d+(?:\.\d*)?)\s*]\s*)?")


class TooManyValues(ValueError):
    """An axis whose values (ranges counted before they are expanded) exceed the plot's cell limit.

    `count` is the number of values up to and including the range that went over (-1: too
    many to count), `more` whether values after it were left uncounted.
    """

    def __init__(self, count: int, limit: int, more: bool = False):
        self.count, self.limit, self.more = count, limit, more
        shown = str(count) if count < 10**15 else f"about {float(count):.2e}"
        super().__init__("gives too many values to count" if count < 0 else
                         f"gives {'at least ' if more else ''}{shown} values")


def csv_string_to_list_strip(text: str) -> list[str]:
    """`a, "b, c", d` -> ["a", "b, c", "d"] (AUTOMATIC1111's CSV splitting of axis values)."""
    rows = csv.reader(StringIO(text), skipinitialspace=True)
    return [v.strip() for row in rows for v in row]


def _shorten(text: str, length: int = 40) -> str:
    return text if len(text) <= length else f"{text[:length // 2]}...{text[-8:]} ({len(text)} characters)"


def _num(text: str, kind: type) -> Any:
    value = kind(text.replace(" ", ""))
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{_shorten(text.strip())} is not a finite number")
    return value


def _count_int_range(start: int, end: int, step: int) -> int:
    # len(range(start, end + (1 if step > 0 else -1), step)), for integers of any size.
    if step > 0:
        return (end - start) // step + 1 if end >= start else 0
    return (start - end) // -step + 1 if start >= end else 0


def _count_float_range(start: float, end: float, step: float) -> int:
    # len(np.arange(start, end + step, step)), computed without making the array (-1: too many to say).
    count = ((end + step) - start) / step
    return max(0, math.ceil(count)) if math.isfinite(count) else -1


def expand_int(values: list[str], limit: int | None = MAX_CELLS) -> list[int]:
    """Integers, `a-b`, `a-b (+s)`, `a-b [n]`.

    With `limit`, raises TooManyValues as soon as the values would be more than `limit`:
    each range is counted (arithmetically) before it is expanded, so `1-10000000` costs
    nothing. A step of 0 and a count below 1 are ValueErrors.
    """
    out: list[int] = []
    for index, value in enumerate(values):
        more = index < len(values) - 1
        m, mc = re_range.fullmatch(value), re_range_count.fullmatch(value)
        if m is not None:
            start, end = _num(m.group(1), int), _num(m.group(2), int)
            step = int(m.group(3)) if m.group(3) is not None else 1
            if step == 0:
                raise ValueError(f"a range step cannot be 0: {value!r}")
            count = _count_int_range(start, end, step)
            if limit is not None and len(out) + count > limit:
                raise TooManyValues(len(out) + count, limit, more)
            out += list(range(start, end + (1 if step > 0 else -1), step))
        elif mc is not None:
            start, end, num = _num(mc.group(1), int), _num(mc.group(2), int), int(mc.group(3))
            if num < 1:
                raise ValueError(f"a range needs a count of at least 1: {value!r}")
            if limit is not None and len(out) + num > limit:
                raise TooManyValues(len(out) + num, limit, more)
            out += [int(x) for x in np.linspace(start, end, num)]
        else:
            out.append(int(value))
            if limit is not None and len(out) > limit:
                raise TooManyValues(len(out), limit, more)
    return out


def expand_float(values: list[str], limit: int | None = MAX_CELLS) -> list[float]:
    """Numbers, `a-b` (step 1), `a-b (+s)`, `a-b [n]`.

    With `limit`, as expand_int. Values that are not finite numbers (`inf`, `nan`, 400
    digits) and a step of 0 are ValueErrors.
    """
    out: list[float] = []
    for index, value in enumerate(values):
        more = index < len(values) - 1
        m, mc = re_range_float.fullmatch(value), re_range_count_float.fullmatch(value)
        if m is not None:
            start, end = _num(m.group(1), float), _num(m.group(2), float)
            step = _num(m.group(3), float) if m.group(3) is not None else 1.0
            if step == 0:
                raise ValueError(f"a range step cannot be 0: {value!r}")
            count = _count_float_range(start, end, step)
            if limit is not None and (count < 0 or len(out) + count > limit):
                raise TooManyValues(len(out) + count if count >= 0 else -1, limit, more)
            # AUTOMATIC1111: np.arange(start, end + step, step); rounding keeps 0.1-steps clean
            out += [round(float(x), 8) for x in np.arange(start, end + step, step)]
        elif mc is not None:
            start, end = _num(mc.group(1), float), _num(mc.group(2), float)
            num = _num(mc.group(3), float)
            if num < 1:
                raise ValueError(f"a range needs a count of at least 1: {value!r}")
            if limit is not None and len(out) + num > limit:
                raise TooManyValues(len(out) + int(num), limit, more)
            out += [round(float(x), 8) for x in np.linspace(start, end, int(num))]
        else:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"{_shorten(value)} is not a finite number")
            out.append(number)
            if limit is not None and len(out) > limit:
                raise TooManyValues(len(out), limit, more)
    return out


# ---- axes --------------------------------------------------------------------------------------------

def _set(name: str) -> Callable[[StableDiffusionProcessingTxt2Img, Any, list], None]:
    def apply(p: StableDiffusionProcessingTxt2Img, value: Any, values: list) -> None:
        setattr(p, name, value)
    return apply


def apply_prompt_sr(p: StableDiffusionProcessingTxt2Img, value: str, values: list[str]) -> None:
    """Replace the first value (the search string) by `value` in the prompt and the negative prompt."""
    search = values[0]
    p.prompt = p.prompt.replace(search, value)
    p.negative_prompt = p.negative_prompt.replace(search, value)


def label_with_name(axis: "AxisOption", value: Any) -> str:
    """AUTOMATIC1111's `format_value_add_label`: `CFG Scale: 7.0`."""
    if isinstance(value, float):
        value = round(value, 8)
    return f"{axis.label}: {value}"


def label_value(axis: "AxisOption", value: Any) -> str:
    """AUTOMATIC1111's `format_value`: the value alone (samplers, Prompt S/R)."""
    return str(value)


def label_negative(axis: "AxisOption", value: str) -> str:
    return f"Negative prompt: {value}" if value else "Negative prompt: (none)"


def label_nothing(axis: "AxisOption", value: Any) -> str:
    return ""


@dataclass(frozen=True)
class AxisOption:
    """One axis type: how its text becomes values, how a value changes the job, how it is labelled."""

    label: str
    kind: type  # int, float or str: how values are parsed
    apply: Callable[[StableDiffusionProcessingTxt2Img, Any, list], None]
    format_value: Callable[["AxisOption", Any], str] = label_with_name
    choices: Callable[[], list[str]] | None = None  # values are names from this list (case-insensitive)
    field: str | None = None  # the processing field it sets, if one


def _sampler_choices() -> list[str]:
    return [s.name for s in sd_samplers.all_samplers]


def _guidance_choices() -> list[str]:
    return [r.name for r in sd_guidance.guidance_rules]


axis_options: list[AxisOption] = [
    AxisOption("Nothing", str, lambda p, v, vs: None, label_nothing),
    AxisOption("Seed", int, _set("seed"), field="seed"),
    AxisOption("Steps", int, _set("steps"), field="steps"),
    AxisOption("CFG Scale", float, _set("cfg_scale"), field="cfg_scale"),
    AxisOption("Sampler", str, _set("sampler_name"), label_value, choices=_sampler_choices, field="sampler_name"),
    AxisOption("Prompt S/R", str, apply_prompt_sr, label_value),
    AxisOption("Negative prompt", str, _set("negative_prompt"), label_negative, field="negative_prompt"),
    AxisOption("Guidance rule", str, _set("guidance"), label_with_name, choices=_guidance_choices, field="guidance"),
    AxisOption("Negative weight", float, _set("negative_weight"), field="negative_weight"),
    AxisOption("Negative start", float, _set("negative_start"), field="negative_start"),
    AxisOption("Negative end", float, _set("negative_end"), field="negative_end"),
    AxisOption("CFG rescale", float, _set("cfg_rescale"), field="cfg_rescale"),
]
AXIS_NAMES = [a.label for a in axis_options]


def find_axis(name: Any, which: str = "x") -> AxisOption:
    """An axis by its label (any case), or by its index in `axis_options` (AUTOMATIC1111's API sends indices)."""
    if name is None or name == "":
        return axis_options[0]
    if isinstance(name, int) and not isinstance(name, bool):
        if 0 <= name < len(axis_options):
            return axis_options[name]
    else:
        for axis in axis_options:
            if axis.label.lower() == str(name).strip().lower():
                return axis
    raise InvalidParameter(f"Unknown {which} axis type {name!r}. Available: {', '.join(AXIS_NAMES)}",
                           field=f"{which}_type")


def parse_axis_values(axis: AxisOption, text: Any, which: str = "x", seed_rng: random.Random | None = None) -> list:
    """The text of an axis -> its values, as AUTOMATIC1111 parses them; a bad value is an InvalidParameter."""
    if axis.label == "Nothing":
        return [None]
    if isinstance(text, (list, tuple)):  # the API may send a list of values
        raw = [str(v).strip() for v in text]
    else:
        raw = csv_string_to_list_strip(str(text or ""))
    if axis.kind is str and not raw and axis.label == "Negative prompt":
        raw = [""]
    if not raw or (axis.kind is not str and any(v == "" for v in raw)):
        raise InvalidParameter(f"{axis.label} axis: no values given" if not raw else
                               f"{axis.label} axis: an empty value in {text!r}", field=f"{which}_values")
    try:
        if axis.kind is int:
            values: list = expand_int(raw, limit=MAX_CELLS)
        elif axis.kind is float:
            values = expand_float(raw, limit=MAX_CELLS)
        elif len(raw) > MAX_CELLS:
            raise TooManyValues(len(raw), MAX_CELLS)
        else:
            values = raw
    except TooManyValues as e:
        raise InvalidParameter(f"{axis.label} axis ({which.upper()}): {_shorten(str(text), 80)!r} {e}; an X/Y/Z "
                               f"plot has at most {MAX_CELLS} cells", field=f"{which}_values") from None
    except (ValueError, OverflowError) as e:
        raise InvalidParameter(f"{axis.label} axis: cannot read {_shorten(str(text), 80)!r} ({_shorten(str(e), 120)})",
                               field=f"{which}_values") from e
    if not values:
        raise InvalidParameter(f"{axis.label} axis: {text!r} gives no values", field=f"{which}_values")
    if axis.choices is not None:
        known = {c.lower(): c for c in axis.choices()}
        for i, v in enumerate(values):
            if axis.label == "Sampler" and v.lower() not in known and sd_samplers.find_sampler_config(v) is not None:
                values[i] = sd_samplers.find_sampler_config(v).name  # an alias (k_euler_a)
                continue
            if v.lower() not in known:
                raise InvalidParameter(f"{axis.label} axis: unknown value {v!r}. Available: {', '.join(known.values())}",
                                       field=f"{which}_values")
            values[i] = known[v.lower()]
    if axis.label == "Seed":  # AUTOMATIC1111's fix_axis_seeds: -1 becomes a random seed
        rng = seed_rng or random.Random()
        values = [rng.randrange(4294967294) if v is None or v == -1 else v for v in values]
    return values


# ---- arguments ---------------------------------------------------------------------------------------

@dataclass
class XYZArgs:
    """The script's arguments, by the names the API takes in `script_args`."""

    x_type: Any = "Nothing"
    x_values: Any = ""
    y_type: Any = "Nothing"
    y_values: Any = ""
    z_type: Any = "Nothing"
    z_values: Any = ""
    draw_legend: bool = True
    include_lone_images: bool = True  # AUTOMATIC1111's "Include Sub Images" (default off there)
    include_sub_grids: bool = False  # with a Z axis: also return each Z value's grid
    no_fixed_seeds: bool = False  # True: seed -1 stays random for every cell
    margin_size: int = 0  # pixels between cells

    @classmethod
    def from_dict(cls, data: dict | None) -> "XYZArgs":
        """Named arguments -> XYZArgs; an unknown name is an InvalidParameter (a typo should not pass)."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidParameter(f"Unknown X/Y/Z plot argument(s): {', '.join(unknown)}. "
                                   f"Known: {', '.join(sorted(names))}", field="script_args")
        for name in ("draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds"):
            if name in data and not isinstance(data[name], bool):
                raise InvalidParameter(f"{name} must be true or false", field=name)
        if "margin_size" in data:
            m = data["margin_size"]
            if isinstance(m, bool) or not isinstance(m, (int, float)) or not float(m).is_integer() or not 0 <= m <= 500:
                raise InvalidParameter("margin_size must be a whole number of pixels from 0 to 500", field="margin_size")
            data["margin_size"] = int(m)
        return cls(**data)


@dataclass
class Axis:
    option: AxisOption
    values: list
    labels: list[str]


def resolve_axes(args: XYZArgs, seed_rng: random.Random | None = None) -> tuple[Axis, Axis, Axis]:
    axes = []
    for which in ("x", "y", "z"):
        option = find_axis(getattr(args, f"{which}_type"), which)
        values = parse_axis_values(option, getattr(args, f"{which}_values"), which, seed_rng)
        axes.append(Axis(option, values, [option.format_value(option, v) for v in values]))
    return tuple(axes)  # type: ignore[return-value]


def cell_processing(p: StableDiffusionProcessingTxt2Img, axes: tuple[Axis, Axis, Axis],
                    ix: int, iy: int, iz: int) -> StableDiffusionProcessingTxt2Img:
    """The base job with the axis values of cell (ix, iy, iz) applied, X first, then Y, then Z."""
    q = copy.deepcopy(p)
    for axis, i in zip(axes, (ix, iy, iz)):
        axis.option.apply(q, axis.values[i], axis.values)
    return q


# ---- the grid image ------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def font_path() -> str:
    """DejaVu Sans, as shipped inside matplotlib: a TrueType font that is there wherever the requirements are."""
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf")


@lru_cache(maxsize=16)
def get_font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(), size)


def font_size_for(width: int, height: int) -> int:
    """AUTOMATIC1111's (width + height) // 25, but never below 12 px: small models make small cells."""
    return max(12, (width + height) // 25)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, max_width: int) -> list[str]:
    """Greedy word wrap (a word longer than the line keeps its own line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


@dataclass
class GridLayout:
    """Where things are in an annotated grid: for tests and for the UI, which label went where."""

    width: int
    height: int
    pad_left: int
    pad_top: int
    cell_width: int
    cell_height: int
    margin: int
    cols: int
    rows: int
    font_size: int

    def cell_box(self, col: int, row: int) -> tuple[int, int, int, int]:
        x = self.pad_left + col * (self.cell_width + self.margin)
        y = self.pad_top + row * (self.cell_height + self.margin)
        return x, y, x + self.cell_width, y + self.cell_height

    def top_label_box(self, col: int) -> tuple[int, int, int, int]:
        x = self.pad_left + col * (self.cell_width + self.margin)
        return x, 0, x + self.cell_width, self.pad_top

    def left_label_box(self, row: int) -> tuple[int, int, int, int]:
        y = self.pad_top + row * (self.cell_height + self.margin)
        return 0, y, self.pad_left, y + self.cell_height


def grid_layout(cell_width: int, cell_height: int, cols: int, rows: int, hor_texts: list[str],
                ver_texts: list[str], margin: int = 0) -> tuple[GridLayout, list[list[str]], list[list[str]]]:
    """The size of the annotated grid, and the labels wrapped into lines.

    As AUTOMATIC1111's draw_grid_annotations: column labels above, row labels to the left
    (3/4 of a cell wide, or wider if a word needs it); a side with only empty labels gets no margin.
    """
    fontsize = font_size_for(cell_width, cell_height)
    font = get_font(fontsize)
    spacing = fontsize // 2
    hor_lines = [wrap_text(t, font, cell_width) for t in hor_texts]
    pad_left = 0
    ver_lines: list[list[str]] = [[""] for _ in ver_texts]
    if any(ver_texts):
        left_width = max(cell_width * 3 // 4, 6 * fontsize)
        ver_lines = [wrap_text(t, font, left_width) for t in ver_texts]
        widest = max(font.getlength(line) for lines in ver_lines for line in lines)
        pad_left = int(max(cell_width * 3 // 4, widest + 2 * spacing))
    pad_top = 0
    if any(hor_texts):
        pad_top = max(len(lines) for lines in hor_lines) * (fontsize + spacing) + spacing * 2
    layout = GridLayout(width=pad_left + cols * cell_width + margin * (cols - 1),
                        height=pad_top + rows * cell_height + margin * (rows - 1), pad_left=pad_left,
                        pad_top=pad_top, cell_width=cell_width, cell_height=cell_height, margin=margin, cols=cols,
                        rows=rows, font_size=fontsize)
    return layout, hor_lines, ver_lines


def _draw_centered(draw: ImageDraw.ImageDraw, lines: list[str], box: tuple[int, int, int, int], font, spacing: int):
    x0, y0, x1, y1 = box
    line_height = font.size + spacing
    top = y0 + (y1 - y0 - len(lines) * line_height + spacing) / 2
    for i, line in enumerate(lines):
        draw.text(((x0 + x1) / 2, top + i * line_height), line, font=font, fill=(0, 0, 0), anchor="mt")


def draw_grid(cells: list[Image.Image], cols: int, rows: int, hor_texts: list[str], ver_texts: list[str],
              margin: int = 0, draw_legend: bool = True) -> tuple[Image.Image, GridLayout]:
    """Cells (row by row) -> one image with column labels on top and row labels on the left."""
    cw, ch = cells[0].size
    if not draw_legend:
        hor_texts, ver_texts = [""] * cols, [""] * rows
    layout, hor_lines, ver_lines = grid_layout(cw, ch, cols, rows, hor_texts, ver_texts, margin)
    grid = Image.new("RGB", (layout.width, layout.height), "white")
    for i, cell in enumerate(cells):
        x0, y0, _, _ = layout.cell_box(i % cols, i // cols)
        grid.paste(cell.convert("RGB").resize((cw, ch)) if cell.size != (cw, ch) else cell.convert("RGB"), (x0, y0))
    draw = ImageDraw.Draw(grid)
    font, spacing = get_font(layout.font_size), layout.font_size // 2
    if layout.pad_top:
        for col, lines in enumerate(hor_lines):
            _draw_centered(draw, lines, layout.top_label_box(col), font, spacing)
    if layout.pad_left:
        for row, lines in enumerate(ver_lines):
            _draw_centered(draw, lines, layout.left_label_box(row), font, spacing)
    return grid, layout


def join_z_grids(grids: list[Image.Image], z_texts: list[str], margin: int = 0,
                 draw_legend: bool = True) -> tuple[Image.Image, GridLayout]:
    """One grid per Z value, side by side, each titled with its Z label (AUTOMATIC1111's layout)."""
    w = max(g.width for g in grids)
    h = max(g.height for g in grids)
    padded = []
    for g in grids:
        if g.size != (w, h):
            canvas = Image.new("RGB", (w, h), "white")
            canvas.paste(g, (0, 0))
            g = canvas
        padded.append(g)
    return draw_grid(padded, len(grids), 1, z_texts, [""], margin, draw_legend)


# ---- running the plot ------------------------------------------------------------------------------------

@dataclass
class XYZProcessed(Processed):
    """The plot's result: `images` are the grid (then each Z grid if asked, then the cells if asked),
    `infotexts` theirs; the labels and the grid's layout say what is where."""

    x_type: str = "Nothing"
    y_type: str = "Nothing"
    z_type: str = "Nothing"
    x_labels: list[str] = field(default_factory=list)
    y_labels: list[str] = field(default_factory=list)
    z_labels: list[str] = field(default_factory=list)
    grid_count: int = 1  # how many of `images` are grids (the rest are cells)
    grid_paths: list[str] = field(default_factory=list)

    def js(self) -> dict:
        d = super().js()
        for name in ("layout", "cells"):
            d.pop(name, None)
        return d


def outpath_grids_for(p: StableDiffusionProcessingTxt2Img) -> Path:
    """outputs/txt2img-grids beside outputs/txt2img-images (img2img: img2img-grids; AUTOMATIC1111's folders)."""
    samples = Path(p.outpath_samples)
    return samples.parent / f"{getattr(p, 'job_name', 'txt2img')}-grids"


ProcessFn = Callable[..., Processed]


def run_xyz(model, p: StableDiffusionProcessingTxt2Img, args: XYZArgs | dict,
            hooks=(), state: JobState | None = None, process: ProcessFn | None = None,
            outpath_grids: str | Path | None = None, save_grid: bool | None = None) -> XYZProcessed:
    """Run every cell (X fastest, then Y, then Z) and assemble the grid.

    Every cell is validated before the first one runs, so a bad value fails the request with
    nothing written. `process(model, p, hooks=, state=)` runs one cell (process_images by
    default). The grid is saved (unless `save_grid` is False; by default it follows
    `p.do_not_save_samples`) under `outpath_grids/<date>/` with the base job's infotext.
    """
    args = XYZArgs.from_dict(args) if isinstance(args, dict) else args
    process = process or processing.process_images
    state = state or JobState()
    xs, ys, zs = resolve_axes(args)
    count = len(xs.values) * len(ys.values) * len(zs.values)
    if count > MAX_CELLS:
        raise InvalidParameter(f"The X/Y/Z plot has {count} cells; at most {MAX_CELLS} are allowed",
                               field="script_args")
    if xs.option.label == "Prompt S/R" or ys.option.label == "Prompt S/R" or zs.option.label == "Prompt S/R":
        for axis in (xs, ys, zs):
            if axis.option.label == "Prompt S/R" and axis.values[0] not in p.prompt \
                    and axis.values[0] not in p.negative_prompt:
                raise InvalidParameter(f"Prompt S/R did not find {axis.values[0]!r} in prompt or negative prompt.",
                                       field="script_args")
    base = copy.deepcopy(p)
    if not args.no_fixed_seeds:  # one seed for every cell (AUTOMATIC1111's fix_seed)
        base.seed = processing.fix_seed(base.seed)
        base.subseed = processing.fix_seed(base.subseed)
    processing.validate(base, model)
    jobs = []
    for iz in range(len(zs.values)):
        for iy in range(len(ys.values)):
            for ix in range(len(xs.values)):
                q = cell_processing(base, (xs, ys, zs), ix, iy, iz)
                try:
                    processing.validate(q, model)
                except UserError as e:
                    raise InvalidParameter(f"X/Y/Z plot cell ({xs.labels[ix]} | {ys.labels[iy]} | {zs.labels[iz]}): "
                                           f"{e}", field=e.field) from e
                jobs.append(q)

    cells: list[Processed | None] = []
    for n, q in enumerate(jobs):
        if state.interrupted:
            cells.append(None)
            continue
        state.textinfo = f"X/Y/Z plot: cell {n + 1} of {len(jobs)}"
        cells.append(process(model, q, hooks=hooks, state=state))
    state.textinfo = None

    first = next((c for c in cells if c is not None and c.images), None)
    size = first.images[0].size if first is not None else (p.width, p.height)
    blank = Image.new("RGB", size, "black")
    tiles = [c.images[0] if c is not None and c.images else blank for c in cells]

    per_z = len(xs.values) * len(ys.values)
    sub_grids, layouts = [], []
    for iz in range(len(zs.values)):
        g, lay = draw_grid(tiles[iz * per_z:(iz + 1) * per_z], len(xs.values), len(ys.values), xs.labels, ys.labels,
                           args.margin_size, args.draw_legend)
        sub_grids.append(g)
        layouts.append(lay)
    if len(sub_grids) > 1:
        grid, layout = join_z_grids(sub_grids, zs.labels, args.margin_size, args.draw_legend)
    else:
        grid, layout = sub_grids[0], layouts[0]

    grid_info = processing.create_infotext(base, model, base.prompt, base.negative_prompt,
                                           base.seed, base.subseed)
    grids = [grid] + (sub_grids if args.include_sub_grids and len(sub_grids) > 1 else [])
    grid_infos = [grid_info] * len(grids)
    grid_paths = []
    if save_grid if save_grid is not None else not p.do_not_save_samples:
        folder = Path(outpath_grids or outpath_grids_for(p))
        settings = dataclasses.replace(p.opts.saving, samples_format=p.opts.grid_format)
        for g, text in zip(grids, grid_infos):
            grid_paths.append(str(images_module.save_image(g, folder, base.seed, text, settings)))

    # Every list runs parallel to `images`: a grid counts as the base job (so code that pairs
    # images[i] with all_seeds[i], like the UI's seed reuse, keeps working).
    done = [c for c in cells if c is not None] if args.include_lone_images else []
    n = len(grids)
    result = XYZProcessed(
        images=grids + [im for c in done for im in c.images],
        infotexts=grid_infos + [t for c in done for t in c.infotexts], prompt=base.prompt,
        negative_prompt=base.negative_prompt, seed=base.seed, subseed=base.subseed,
        all_prompts=[base.prompt] * n + [q for c in done for q in c.all_prompts],
        all_negative_prompts=[base.negative_prompt] * n + [q for c in done for q in c.all_negative_prompts],
        all_seeds=[base.seed] * n + [s for c in done for s in c.all_seeds],
        all_subseeds=[base.subseed] * n + [s for c in done for s in c.all_subseeds],
        subseed_strength=base.subseed_strength, width=base.width, height=base.height,
        sampler_name=first.sampler_name if first is not None else base.sampler_name, cfg_scale=base.cfg_scale,
        steps=base.steps, batch_size=base.batch_size, clip_skip=base.clip_skip, sd_model_name=model.name,
        sd_model_hash=model.shorthash, job_timestamp=state.job_timestamp,
        interrupted=any(c is None or c.interrupted for c in cells),
        saved_paths=[s for c in cells if c is not None for s in c.saved_paths],
        x_type=xs.option.label, y_type=ys.option.label, z_type=zs.option.label,
        x_labels=xs.labels, y_labels=ys.labels, z_labels=zs.labels, grid_count=len(grids), grid_paths=grid_paths)
    result.layout = layout  # not dataclass fields: kept out of js() / asdict
    result.cells = cells
    result.cell_jobs = jobs
    return result
