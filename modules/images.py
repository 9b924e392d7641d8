"""Saving images with their generation parameters, and reading them back.

The parameters travel in the PNG's `parameters` text chunk in AUTOMATIC1111's infotext
format, so its PNG Info tab, this project's, and tools that read either agree.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, fields as dataclass_fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")


def quote(value) -> str:
    """Infotext values with `,`, `:` or a newline are written JSON-quoted."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def format_parameters(params: dict) -> str:
    """`Key: value, Key: value` for the entries whose value is not None."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


_re_param_key_run = re.compile(r"[\w \-/]+")
_re_word_char = re.compile(r"\w")
_re_param_quoted = re.compile(r'"(?:\\.|[^\\"])+"')
_re_param_spaces = re.compile(r"\s*")


def parameter_pairs(line: str) -> list[tuple[str, str]]:
    """`re_param.findall(line)`, AUTOMATIC1111's `key: value` pairs of an infotext line, in linear time.

    re_param's key `\\w[\\w \\-/]+:` is retried at every position of a long run of words and
    spaces that ends without a ":", so findall is quadratic (3 s for 20,000 characters). The
    same pairs, found once per run: a key is the part of a run of `[\\w \\-/]` from its first
    word character (at or after where the previous pair ended) to the run's end, when a ":"
    follows and it has at least 2 characters; its value is a JSON-quoted string followed by
    "," or the end, or else everything up to the next ",".
    """
    out: list[tuple[str, str]] = []
    pos, n = 0, len(line)
    for run in _re_param_key_run.finditer(line):
        e = run.end()
        if e <= pos or e >= n or line[e] != ":":
            continue
        first = _re_word_char.search(line, max(run.start(), pos), e)
        if first is None or e - first.start() < 2:
            continue
        start = _re_param_spaces.match(line, e + 1).end()
        quoted = _re_param_quoted.match(line, start)
        end = quoted.end() if quoted is not None else -1
        if quoted is not None and (end == n or line[end] == "," or (end == n - 1 and line[end] == "\n")):
            value, pos = quoted.group(0), end + (line[end:end + 1] == ",")
        else:
            comma = line.find(",", start)
            value, pos = (line[start:comma], comma + 1) if comma >= 0 else (line[start:], n)
        out.append((line[first.start():e], value))
    return out


def parse_generation_parameters(text: str) -> dict[str, str]:
    """Infotext -> {"Prompt", "Negative prompt", "Steps", "Size-1", "Size-2", ...}, as AUTOMATIC1111.

    The last line holds the parameters only if it has at least 3 `key: value` pairs; lines
    from `Negative prompt:` on form the negative prompt. Linear in the length of the text
    (it comes from images that clients upload).
    """
    res: dict[str, str] = {}
    *lines, lastline = text.strip().split("\n")
    pairs = parameter_pairs(lastline)
    if len(pairs) < 3:
        lines.append(lastline)
        pairs = []
    prompt: list[str] = []
    negative_prompt: list[str] = []
    done_with_prompt = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        (negative_prompt if done_with_prompt else prompt).append(line)

    def joined(parts: list[str]) -> str:  # AUTOMATIC1111 adds a line only once the text is not empty
        first = next((i for i, part in enumerate(parts) if part), len(parts))
        return "\n".join(parts[first:])

    res["Prompt"] = joined(prompt)
    res["Negative prompt"] = joined(negative_prompt)
    for k, v in pairs:
        v = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


# Infotext key -> (StableDiffusionProcessingTxt2Img field, type), for "send to txt2img" and the API.
INFOTEXT_FIELDS: dict[str, tuple[str, type]] = {
    "Prompt": ("prompt", str),
    "Negative prompt": ("negative_prompt", str),
    "Steps": ("steps", int),
    "Sampler": ("sampler_name", str),
    "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Size-1": ("width", int),
    "Size-2": ("height", int),
    "Variation seed": ("subseed", int),
    "Variation seed strength": ("subseed_strength", float),
    "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float),
    "Eta DDIM": ("eta", float),
    "NGMS": ("s_min_uncond", float),
    "Guidance": ("guidance", str),
    "Negative weight": ("negative_weight", float),
    "Negative start": ("negative_start", float),
    "Negative end": ("negative_end", float),
    "Guidance interval": ("guidance_interval", lambda v: tuple(float(x) for x in v.split("-"))),
    "CFG rescale": ("cfg_rescale", float),
    "NAG scale": ("nag_scale", float),
    "NAG tau": ("nag_tau", float),
    "NAG alpha": ("nag_alpha", float),
    "NAG start": ("nag_start", float),
    "NAG end": ("nag_end", float),
    "DNG scale": ("dng_scale", float),
    "DNG prior": ("dng_prior", float),
    "DNG temperature": ("dng_temperature", float),
    "DNG offset": ("dng_offset", float),
    "DNG p min": ("dng_p_min", float),
    "DNG p max": ("dng_p_max", float),
    "NAG follows DNG": ("nag_follows_dng", lambda v: v.strip().lower() in ("1", "true")),
    "APG eta": ("apg_eta", float),
    "APG norm threshold": ("apg_norm_threshold", float),
    "APG momentum": ("apg_momentum", float),
    "dynthres_mimic_scale": ("dynthres_mimic_scale", float),
    "dynthres_threshold_percentile": ("dynthres_threshold_percentile", float),
    "dynthres_mimic_mode": ("dynthres_mimic_mode", str),
    "dynthres_mimic_scale_min": ("dynthres_mimic_scale_min", float),
    "dynthres_cfg_mode": ("dynthres_cfg_mode", str),
    "dynthres_cfg_scale_min": ("dynthres_cfg_scale_min", float),
    "dynthres_sched_val": ("dynthres_sched_val", float),
    # img2img, inpainting, hires fix, tiling (AUTOMATIC1111's keys; "Hires resize" WxH parses as -1 / -2)
    "Denoising strength": ("denoising_strength", float),
    "Mask blur": ("mask_blur", int),
    "Masked content": ("inpainting_fill", lambda v: ["fill", "original", "latent noise", "latent nothing"].index(v)),
    "Inpaint area": ("inpaint_full_res", lambda v: ["Whole picture", "Only masked"].index(v) == 1),
    "Masked area padding": ("inpaint_full_res_padding", int),
    "Mask mode": ("inpainting_mask_invert", lambda v: ["Inpaint masked", "Inpaint not masked"].index(v)),
    "Noise multiplier": ("initial_noise_multiplier", float),
    "Image CFG scale": ("image_cfg_scale", float),
    "Hires upscale": ("hr_scale", float),
    "Hires resize-1": ("hr_resize_x", int),
    "Hires resize-2": ("hr_resize_y", int),
    "Hires upscaler": ("hr_upscaler", str),
    "Hires steps": ("hr_second_pass_steps", int),
    "Hires prompt": ("hr_prompt", str),
    "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires sampler": ("hr_sampler_name", str),
    "Hires schedule type": ("hr_scheduler", str),
    "Hires CFG Scale": ("hr_cfg", float),
    "Tiling": ("tiling", lambda v: ["False", "True"].index(v) == 1),
}

# Keys that record what a job used without setting a field (AUTOMATIC1111's): `TI hashes` (the embeddings the
# prompts used) and `Lora hashes` (the LoRAs applied), each "name: 12-digit hash, name2: hash2".
INFOTEXT_HASH_KEYS = ("TI hashes", "Lora hashes")


def parse_hashes(value: str) -> dict[str, str]:
    """`"a: 0123456789ab, b: ba9876543210"` (a TI hashes / Lora hashes value) -> {"a": ..., "b": ...}."""
    out = {}
    for part in (value or "").split(","):
        name, sep, digest = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = digest.strip()
    return out


def infotext_to_fields(params: dict[str, str]) -> dict:
    """Parsed infotext -> the processing fields it sets (unknown keys and bad values are left out)."""
    fields = {}
    for key, (name, kind) in INFOTEXT_FIELDS.items():
        if key in params:
            try:
                fields[name] = kind(params[key])
            except ValueError:
                pass
    return fields


def read_info_from_image(image: Image.Image) -> str | None:
    """The infotext stored in an image, or None: a PNG's `parameters` chunk, or the EXIF UserComment
    AUTOMATIC1111 writes into JPEG, WebP and AVIF files."""
    if not hasattr(image, "info"):
        return None
    if image.info.get("parameters"):
        return image.info["parameters"]
    try:
        comment = image.getexif().get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT)
    except Exception:  # a damaged EXIF block is no infotext
        return None
    return user_comment_text(comment) if isinstance(comment, bytes) else None


EXIF_IFD, EXIF_USER_COMMENT = 0x8769, 0x9286


def user_comment_bytes(text: str) -> bytes:
    """EXIF UserComment in its UNICODE form (8-byte charset code, then UTF-16 big-endian), as piexif writes it."""
    return b"UNICODE\0" + text.encode("utf-16-be")


def user_comment_text(data: bytes) -> str | None:
    code, body = data[:8], data[8:]
    if code == b"UNICODE\0":
        return body.decode("utf-16-be", errors="replace")
    if code == b"ASCII\0\0\0":
        return body.decode("ascii", errors="replace")
    return None


def latents_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) images in [-1, 1] -> 8-bit PIL images (rounded, as diffusers does)."""
    arr = ((images.float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def next_sequence_number(path: Path) -> int:
    """The next free NNNNN prefix in a folder, as AUTOMATIC1111 numbers its outputs."""
    numbers = [int(m.group(1)) for f in (os.listdir(path) if path.is_dir() else [])
               if (m := re.match(r"^(\d+)-", f))]
    return max(numbers, default=-1) + 1


def png_bytes(image: Image.Image, info: str | None = None) -> bytes:
    """The one PNG writer: the image with its infotext in the `parameters` text chunk."""
    import io

    pnginfo = PngImagePlugin.PngInfo()
    if info:
        pnginfo.add_text("parameters", info)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def write_png(path: str | Path, image: Image.Image, info: str | None = None) -> Path:
    """Write `png_bytes` to `path` under a temporary name and rename it, so a failure (or a reader
    racing the write) never sees a half-written image."""
    return write_image(path, image, info)


@dataclass(frozen=True)
class SaveSettings:
    """AUTOMATIC1111's options for the files a job writes (field names are the option keys)."""

    samples_format: str = "png"  # png, jpg, jpeg, webp, avif
    save_images_add_number: bool = True  # NNNNN- before the name
    save_images_replace_action: str = "Replace"  # without the number, an existing name: "Add number suffix"
    jpeg_quality: int = 80  # jpeg, webp and avif
    webp_lossless: bool = False
    save_to_dirs: bool = True  # a subfolder per day (A1111's directories_filename_pattern "[date]")
    enable_pnginfo: bool = True  # the infotext in the file (PNG chunk / EXIF UserComment)
    save_txt: bool = False  # the infotext also in a .txt beside it

    @classmethod
    def from_options(cls, options) -> "SaveSettings":
        return cls(**{f.name: options[f.name] for f in dataclass_fields(cls) if options.get(f.name) is not None})

    @property
    def extension(self) -> str:
        return self.samples_format.lower()


def image_bytes(image: Image.Image, info: str | None = None, settings: SaveSettings | None = None) -> bytes:
    """The image encoded as `settings.samples_format` says, with its infotext: the PNG `parameters`
    chunk, or for JPEG / WebP / AVIF the EXIF UserComment (AUTOMATIC1111's save_image_with_geninfo)."""
    import io

    settings = settings or SaveSettings()
    fmt = settings.extension
    if fmt == "png":
        return png_bytes(image, info if settings.enable_pnginfo else None)
    if fmt not in ("jpg", "jpeg", "webp", "avif"):
        raise ValueError(f"unknown image format {fmt!r}")
    kwargs: dict = {"quality": int(settings.jpeg_quality)}
    if info and settings.enable_pnginfo:
        exif = Image.Exif()
        exif.get_ifd(EXIF_IFD)[EXIF_USER_COMMENT] = user_comment_bytes(info)
        kwargs["exif"] = exif.tobytes()
    if fmt == "webp":
        kwargs["lossless"] = bool(settings.webp_lossless)
    if fmt in ("jpg", "jpeg") and image.mode != "RGB":
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format={"jpg": "JPEG", "jpeg": "JPEG"}.get(fmt, fmt.upper()), **kwargs)
    return buf.getvalue()


def write_image(path: str | Path, image: Image.Image, info: str | None = None,
                settings: SaveSettings | None = None) -> Path:
    """`image_bytes` written under a temporary name and renamed: never a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(image_bytes(image, info, settings))
    os.replace(tmp, path)
    return path


def save_image(image: Image.Image, path: str | Path, seed: int, info: str | None,
               settings: SaveSettings | None = None) -> Path:
    """Save as `path/<date>/NNNNN-<seed>.<format>` with the infotext, as AUTOMATIC1111 names its files.

    `settings` (the job's saving options): no date folder without `save_to_dirs`; without
    `save_images_add_number` the name is `<seed>.<format>`, an existing one replaced or, with
    "Add number suffix", `<seed>_<n>`; `save_txt` writes the infotext beside it.
    """
    settings = settings or SaveSettings()
    path = Path(path)
    if settings.save_to_dirs:
        path = path / time.strftime("%Y-%m-%d")
    path.mkdir(parents=True, exist_ok=True)
    ext = settings.extension
    if settings.save_images_add_number:
        number = next_sequence_number(path)
        target = path / f"{number:05}-{seed}.{ext}"
        while target.exists():  # a file of another format may hold the number
            number += 1
            target = path / f"{number:05}-{seed}.{ext}"
    else:
        target = path / f"{seed}.{ext}"
        n = 0
        while settings.save_images_replace_action != "Replace" and target.exists():
            target = path / f"{seed}_{n}.{ext}"
            n += 1
    written = write_image(target, image, info, settings)
    if settings.save_txt and info:
        written.with_suffix(".txt").write_text(info, encoding="utf8")
    return written


def image_grid(tiles: list[Image.Image], cols: int, size: tuple[int, int] | None = None,
               background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """The one grid maker: tiles row by row, `cols` per row, each in a cell of `size` (default: the
    first tile's); a None tile leaves its cell empty."""
    size = size or next(t.size for t in tiles if t is not None)
    rows = max(1, math.ceil(len(tiles) / max(1, cols)))
    grid = Image.new("RGB", (cols * size[0], rows * size[1]), background)
    for i, tile in enumerate(tiles):
        if tile is not None:
            grid.paste(tile if tile.size == size else tile.resize(size), ((i % cols) * size[0], (i // cols) * size[1]))
    return grid


# -- img2img: resizing, flattening, tiles (AUTOMATIC1111's images.resize_image / flatten / split_grid) --------

LANCZOS = Image.Resampling.LANCZOS


def flatten(img: Image.Image, bgcolor: str = "#ffffff") -> Image.Image:
    """Transparency replaced by `bgcolor` (AUTOMATIC1111's option img2img_background_color), as RGB."""
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, bgcolor)
        background.paste(img, mask=img)
        img = background
    return img.convert("RGB")


def resize_image(resize_mode: int, im: Image.Image, width: int, height: int, upscaler_name: str | None = None,
                 models_dir: str | Path | None = None, allow_pickle: bool = False, device="cpu") -> Image.Image:
    """AUTOMATIC1111's `resize_image`: 0 just resize, 1 crop and resize (fill the box, crop the overflow),
    2 resize and fill (fit inside, stretch the edge rows/columns into the bands left); 3 (latent
    upscale) resizes like 2. Enlarging goes through `upscaler_name` (a pixel upscaler; None: Lanczos)."""
    from modules import upscaler

    def resize(im: Image.Image, w: int, h: int) -> Image.Image:
        return upscaler.upscale_image(im, upscaler_name, size=(w, h), models_dir=models_dir,
                                      allow_pickle=allow_pickle, device=device)

    if resize_mode == 0:
        return resize(im, width, height)
    ratio, src_ratio = width / height, im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB" if im.mode != "L" else "L", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return res
    src_w = width if ratio < src_ratio else im.width * height // im.height
    src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = resize(im, src_w, src_h)
    res = Image.new("RGB" if im.mode != "L" else "L", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
            res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                      box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
            res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                      box=(fill_width + src_w, 0))
    return res


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """RGB pictures of one size -> (N, 3, H, W) float32 in [-1, 1], what the VAE encodes."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2.0 - 1.0


class Grid:
    """Tiles of a picture: `tiles` is [[y, tile_h, [[x, tile_w, tile], ...]], ...] (AUTOMATIC1111's Grid)."""

    def __init__(self, tiles, tile_w: int, tile_h: int, image_w: int, image_h: int, overlap: int):
        self.tiles, self.tile_w, self.tile_h = tiles, tile_w, tile_h
        self.image_w, self.image_h, self.overlap = image_w, image_h, overlap


def split_grid(image: Image.Image, tile_w: int = 512, tile_h: int = 512, overlap: int = 64) -> Grid:
    """Cut `image` into overlapping tiles of tile_w x tile_h, spread evenly (AUTOMATIC1111's split_grid)."""
    w, h = image.width, image.height
    non_overlap_width, non_overlap_height = tile_w - overlap, tile_h - overlap
    cols = max(1, math.ceil((w - overlap) / non_overlap_width))
    rows = max(1, math.ceil((h - overlap) / non_overlap_height))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        row_images = []
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            row_images.append([x, tile_w, image.crop((x, y, x + tile_w, y + tile_h))])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def combine_grid(grid: Grid) -> Image.Image:
    """Put the tiles back, blending each overlap with a linear ramp (AUTOMATIC1111's combine_grid)."""
    def make_mask_image(r: np.ndarray) -> Image.Image:
        return Image.fromarray((r * 255 / grid.overlap).astype(np.uint8), "L")

    combined_image = Image.new("RGB", (grid.image_w, grid.image_h))
    if grid.overlap > 0:
        mask_w = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap))
                                 .repeat(grid.tile_h, axis=0))
        mask_h = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1))
                                 .repeat(grid.image_w, axis=1))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0 or grid.overlap <= 0:
                combined_row.paste(tile, (x, 0))
                continue
            combined_row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0 or grid.overlap <= 0:
            combined_image.paste(combined_row, (0, y))
            continue
        combined_image.paste(combined_row.crop((0, 0, combined_row.width, grid.overlap)), (0, y), mask=mask_h)
        combined_image.paste(combined_row.crop((0, grid.overlap, combined_row.width, h)), (0, y + grid.overlap))
    return combined_image


# ---- images from clients: read text without decoding, decode only what is safe ------------------------------
#
# What a client sends is parsed by these functions before anything else sees it: the format is
# told from the first bytes (PNG, JPEG, WebP; Pillow's other plugins, EPS through Ghostscript
# included, are never reached), text is read from the chunks without decoding a pixel, and an
# image is decoded only after the size its header declares has been checked (a 500 KB PNG can
# declare 13000x13000 pixels: 500 MB decoded; opening a WebP with Pillow already allocates its
# whole canvas, so its size is read from the RIFF header first).

import base64  # noqa: E402
import binascii  # noqa: E402
import io  # noqa: E402
import zlib  # noqa: E402

from PIL import ImageOps  # noqa: E402

from modules.errors import InvalidParameter  # noqa: E402

ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_IMAGE_BYTES = 50 * 2**20  # a 2048x2048 PNG is at most ~12 MB
MAX_TEXT_CHUNK = 2**20  # one decompressed text chunk (Pillow's own limit)
MAX_TEXT_TOTAL = 16 * 2**20  # all text chunks of one image
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10; each one decodes the whole image again


def _refuse_format(field: str) -> InvalidParameter:
    return InvalidParameter(f"{field}: not a PNG, JPEG or WebP image (the accepted formats)", field=field)


def image_format(data: bytes) -> str | None:
    """"PNG", "JPEG" or "WEBP" from the first bytes of `data`; None for anything else."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _png_chunks(data: bytes):
    # (type, payload) of each chunk, up to IEND or the end of the data (a truncated chunk ends it).
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind = data[pos + 4:pos + 8]
        payload = data[pos + 8:pos + 8 + length]
        if len(payload) < length:
            return
        yield kind, payload
        if kind == b"IEND":
            return
        pos += 12 + length


def _riff_chunks(data: bytes):
    # (fourcc, payload) of each chunk of a WebP's RIFF container.
    pos = 12
    while pos + 8 <= len(data):
        kind = data[pos:pos + 4]
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        payload = data[pos + 8:pos + 8 + length]
        if len(payload) < length:
            return
        yield kind, payload
        pos += 8 + length + (length & 1)


def _jpeg_segments(data: bytes):
    # (marker, payload) of each segment before the first scan (SOS) or EOI.
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD9, 0xDA):
            yield marker, b""
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            return
        yield marker, data[pos + 4:pos + 2 + length]
        pos += 2 + length


def _inflate(payload: bytes, field: str, budget: list[int]) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        out = decompressor.decompress(payload, MAX_TEXT_CHUNK + 1)
    except zlib.error as e:
        raise InvalidParameter(f"{field}: a compressed text chunk of the image is corrupt ({e})", field=field) from e
    if len(out) > MAX_TEXT_CHUNK:
        raise InvalidParameter(f"{field}: a text chunk of the image decompresses to more than "
                               f"{MAX_TEXT_CHUNK // 2**20} MB", field=field)
    budget[0] -= len(out)
    return out


def _png_text(data: bytes, field: str) -> dict[str, str]:
    # tEXt, zTXt and iTXt, as Pillow reads them into `info` (a later chunk of a key wins).
    out: dict[str, str] = {}
    budget = [MAX_TEXT_TOTAL]
    for kind, payload in _png_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):
            continue
        key, sep, rest = payload.partition(b"\0")
        if not sep or not key:
            continue
        budget[0] -= len(payload)
        if kind == b"tEXt":
            value = rest.decode("latin-1")
        elif kind == b"zTXt":
            if rest[:1] != b"\0":  # compression method 0 (zlib) is the only one
                continue
            value = _inflate(rest[1:], field, budget).decode("latin-1")
        else:
            if len(rest) < 2:
                continue
            compressed, method, rest = rest[0], rest[1], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _translated, _, text = rest.partition(b"\0")
            if compressed:
                if method != 0:
                    continue
                text = _inflate(text, field, budget)
            value = text.decode("utf-8", errors="replace")
        if budget[0] < 0:
            raise InvalidParameter(f"{field}: the image's text chunks hold more than {MAX_TEXT_TOTAL // 2**20} MB",
                                   field=field)
        out[key.decode("latin-1")] = value
    return out


def _exif_user_comment(exif: bytes) -> str | None:
    # The EXIF UserComment, decoded as AUTOMATIC1111 does (piexif.helper.UserComment.load, or
    # the raw bytes as UTF-8 when its 8-byte encoding prefix is unknown).
    try:
        parsed = Image.Exif()
        parsed.load(exif)
        comment = parsed.get_ifd(0x8769).get(0x9286)
    except Exception:
        return None
    if isinstance(comment, str):
        return comment or None
    if not isinstance(comment, bytes) or not comment:
        return None
    prefix, body = comment[:8], comment[8:]
    encoding = {b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"UNICODE\0": "utf_16_be"}.get(prefix)
    text = body.decode(encoding, errors="replace") if encoding else comment.decode("utf-8", errors="ignore")
    return text or None


def read_image_text(data: bytes, field: str = "image") -> dict[str, str]:
    """The text an image carries, read without decoding its pixels: `{"parameters": infotext, ...}`.

    PNG: every tEXt, zTXt and iTXt chunk (key -> text), wherever it is in the file. JPEG and
    WebP: `parameters` from the EXIF UserComment, as AUTOMATIC1111 writes it (a JPEG without
    EXIF: its COM comment). Nothing found: `{}`. Other formats, and compressed text beyond
    `MAX_TEXT_CHUNK` (or `MAX_TEXT_TOTAL` in all): InvalidParameter(field=field).
    Linear in the size of the data; memory bounded by it plus MAX_TEXT_TOTAL.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidParameter(f"{field}: expected the bytes of an image", field=field)
    data = bytes(data)
    kind = image_format(data)
    if kind is None:
        raise _refuse_format(field)
    if kind == "PNG":
        return _png_text(data, field)
    exif = comment = None
    if kind == "JPEG":
        for marker, payload in _jpeg_segments(data):
            if marker == 0xE1 and payload.startswith(b"Exif\0\0") and exif is None:
                exif = payload
            elif marker == 0xFE and comment is None:
                comment = payload
    else:
        for fourcc, payload in _riff_chunks(data):
            if fourcc == b"EXIF" and exif is None:
                exif = payload
    out: dict[str, str] = {}
    if exif is not None:
        text = _exif_user_comment(exif)
        if text:
            out["parameters"] = text
    elif comment:
        out["parameters"] = comment.decode("utf-8", errors="ignore")
    return out


def _declared_size(data: bytes, kind: str) -> tuple[int, int] | None:
    # Width and height from the header, before any decoder sees the data (None: not found).
    if kind == "PNG":
        if data[12:16] != b"IHDR" or len(data) < 24:
            return None
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if kind == "WEBP":
        for fourcc, payload in _riff_chunks(data):
            if fourcc == b"VP8X" and len(payload) >= 10:
                return int.from_bytes(payload[4:7], "little") + 1, int.from_bytes(payload[7:10], "little") + 1
            if fourcc == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":
                return (int.from_bytes(payload[6:8], "little") & 0x3FFF,
                        int.from_bytes(payload[8:10], "little") & 0x3FFF)
            if fourcc == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:
                bits = int.from_bytes(payload[1:5], "little")
                return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
            if fourcc in (b"VP8 ", b"VP8L"):
                return None
        return None
    for marker, payload in _jpeg_segments(data):
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF) \
                and len(payload) >= 5:
            return int.from_bytes(payload[3:5], "big"), int.from_bytes(payload[1:3], "big")
    return None


def decode_image(data: bytes, field: str = "image", max_side: int = 2048) -> Image.Image:
    """The bytes of a PNG, JPEG or WebP image from a client -> a loaded RGB or RGBA image.

    Checked before decoding: the format (from the first bytes), the size of the data, and the
    width and height the header declares (at most `max_side` each), so a decompression bomb
    costs nothing; a progressive JPEG may have at most MAX_JPEG_SCANS scans. Then decoded
    with only that format's Pillow plugin, turned by its EXIF orientation (as AUTOMATIC1111's
    images.read), and converted: RGBA if it has transparency, RGB otherwise. Every refusal,
    and every image Pillow cannot decode (truncated, corrupt), is InvalidParameter(field=field).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidParameter(f"{field}: expected the bytes of an image", field=field)
    data = bytes(data)
    if not data:
        raise InvalidParameter(f"{field}: the image is empty", field=field)
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidParameter(f"{field}: the image is {len(data) / 2**20:.1f} MB; at most "
                               f"{MAX_IMAGE_BYTES // 2**20} MB are accepted", field=field)
    kind = image_format(data)
    if kind is None:
        raise _refuse_format(field)
    size = _declared_size(data, kind)
    if size is None:
        raise InvalidParameter(f"{field}: not a valid {kind} image (no size in its header)", field=field)

    def check(width: int, height: int) -> None:
        if width < 1 or height < 1:
            raise InvalidParameter(f"{field}: the {kind} image declares a size of {width}x{height}", field=field)
        if max(width, height) > max_side:
            raise InvalidParameter(f"{field}: the image is {width}x{height} pixels; at most {max_side} pixels on "
                                   f"a side are accepted", field=field)

    check(*size)
    if kind == "JPEG" and data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise InvalidParameter(f"{field}: the JPEG has more than {MAX_JPEG_SCANS} scans", field=field)
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])
        check(*image.size)  # what the decoder will produce, if the header parse above was fooled
        image.load()
        image = ImageOps.exif_transpose(image) or image
    except InvalidParameter:
        raise
    except Exception as e:  # truncated, corrupt, a bomb Pillow noticed: the client's data, not our bug
        raise InvalidParameter(f"{field}: cannot decode the {kind} image ({type(e).__name__}: {e})",
                               field=field) from e
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16-bit grey: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    if image.mode == "RGBA" or image.mode in ("LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return image.convert("RGBA") if image.mode != "RGBA" else image
    return image.convert("RGB") if image.mode != "RGB" else image


def decode_base64_bytes(text: str, field: str = "image") -> bytes:
    """Raw base64 or a `data:...;base64,` URI -> the bytes it holds; anything else is InvalidParameter.

    Whitespace inside the base64 (line breaks of MIME-style base64) is ignored and missing
    `=` padding is added; URLs are refused (nothing is fetched for a client).
    """
    if not isinstance(text, str):
        raise InvalidParameter(f"{field}: expected a base64 string", field=field)
    text = text.strip()
    if text.startswith(("http://", "https://")):
        raise InvalidParameter(f"{field}: image URLs are not accepted: send the image as base64", field=field)
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or ";base64" not in header:
            raise InvalidParameter(f"{field}: invalid encoded image: a data URI must be base64", field=field)
    text = "".join(text.split())
    if len(text) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidParameter(f"{field}: the image is more than {MAX_IMAGE_BYTES // 2**20} MB", field=field)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidParameter(f"{field}: invalid encoded image: not base64 ({e})", field=field) from e


def decode_base64_image(text: str, field: str = "image", max_side: int = 2048) -> Image.Image:
    """decode_base64_bytes + decode_image: what an API field holding an image goes through."""
    return decode_image(decode_base64_bytes(text, field), field, max_side)
