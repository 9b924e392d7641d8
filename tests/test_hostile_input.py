"""Nothing a client sends can freeze the server: the reproductions of the issue, each answered in bounded time.

One test per reproduction (1-5), asserting the answer (a result, or an InvalidParameter that
names the field) and a generous bound on the time (this runs on a slow shared 2-core CI
machine). Then the image functions that clients' images go through.
"""
from __future__ import annotations

import base64
import io
import struct
import time
import tracemalloc
import zlib

import pytest
from PIL import Image

from modules import images, prompt_parser
from modules.errors import InvalidParameter
from modules.prompt_parser import PromptTooComplex, check_prompt
from modules.scripts.xyz_grid import find_axis, parse_axis_values

INFOTEXT_TAIL = "Steps: 5, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 64x64"


class timed:
    """`with timed() as t: ...; t.seconds`."""

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---- 1. parser blow-up: 1,000 "[" took 41.8 s and 1.08 GB -----------------------------------------

@pytest.mark.parametrize("count", [100, 200, 300, 1000])
def test_1_brackets_are_answered_at_once(count):
    prompt = "[" * count
    with timed() as t:
        assert prompt_parser.get_learned_conditioning_prompt_schedules([prompt], 150) == [[[150, prompt]]]
        closed = prompt_parser.get_learned_conditioning_prompt_schedules([prompt + "a:b:0.5]"], 150)[0]
        assert closed == [[75, "[" * (count - 1) + "a"], [150, "[" * (count - 1) + "b"]]
    assert t.seconds < 2
    with timed() as t, pytest.raises(PromptTooComplex, match=f"at most {prompt_parser.MAX_NESTING}") as e:
        check_prompt(prompt, "prompt")  # the job layer refuses it before queueing: a 422
    assert e.value.field == "prompt" and e.value.status_code == 422 and t.seconds < 0.5


def test_1_real_prompts_with_many_groups_stay_fast():
    # A1111's Earley parser: 5 s for this 1,300-character prompt (80 groups, nothing unusual).
    prompt = "(masterpiece:1.2), (best quality), [[ultra detailed]], [a:b:0.3], " * 20
    with timed() as t:
        schedule = prompt_parser.get_learned_conditioning_prompt_schedules([prompt], 150)[0]
        check_prompt(prompt, "prompt")
    assert [end for end, _ in schedule] == [45, 150] and t.seconds < 1


# ---- 2. quadratic regexes: 20,000 spaces took 11.8 s, a 20k infotext 2.9 s -------------------------

def test_2_twenty_thousand_spaces_in_a_prompt():
    prompt = "a" + " " * 20000 + "b"
    with timed() as t:
        assert prompt_parser.split_and(prompt) == [(prompt, 1.0)]
        res_indexes, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
        assert list(flat) == [prompt]
        assert prompt_parser.parse_prompt_attention(prompt) == [[prompt, 1.0]]
        assert prompt_parser.parse_prompt_attention(prompt + " BREAK c")[-1] == ["c", 1.0]
        assert prompt_parser.get_learned_conditioning_prompt_schedules([prompt + "[x:1]"], 20)[0][0][0] == 1
    assert t.seconds < 1
    with pytest.raises(PromptTooComplex) as e:  # and it is longer than a prompt may be
        check_prompt(prompt, "negative_prompt")
    assert e.value.field == "negative_prompt"


@pytest.mark.parametrize("text", [
    "word " * 4000,  # no ":" anywhere: A1111's key pattern retried at every position
    "word " * 4000 + "\nNegative prompt: " + "bad " * 100 + "\n" + INFOTEXT_TAIL,
    "a:" * 10000,
    "Steps: 20, " * 1800,
    'k: "' + "x" * 20000,
    "\n" * 20000 + INFOTEXT_TAIL,
])
def test_2_twenty_thousand_character_infotext(text):
    with timed() as t:
        params = images.parse_generation_parameters(text)
    assert t.seconds < 0.5
    assert "Prompt" in params and "Negative prompt" in params


def test_2_infotext_results_are_unchanged():
    text = ("masterpiece, (best quality:1.2)\nNegative prompt: lowres\n" + INFOTEXT_TAIL
            + ', Lora hashes: "a: 1234, b: 5678"')
    params = images.parse_generation_parameters(text)
    assert params["Prompt"] == "masterpiece, (best quality:1.2)" and params["Negative prompt"] == "lowres"
    assert params["Size-1"] == "64" and params["Lora hashes"] == "a: 1234, b: 5678" and params["Steps"] == "5"
    for line in [INFOTEXT_TAIL, 'A: "x, y", B: 3, -C/d e: 1,', "  key : value, x:1, y:\"q\\\"\",z:2", "a: b: c"]:
        assert images.parameter_pairs(line) == images.re_param.findall(line)


# ---- 3. X/Y/Z ranges expanded before the 512-cell limit ------------------------------------------

@pytest.mark.parametrize("axis,text", [
    ("Seed", "1-10000000"),  # 8.5 s and 1 GB before its 422
    ("CFG Scale", "1-10 [100000000000]"),  # numpy out of memory: a 500
    ("CFG Scale", "0-1000000 (+0.0001)"),  # a 500
])
def test_3_xyz_ranges_are_counted_before_they_are_expanded(axis, text):
    with timed() as t, pytest.raises(InvalidParameter) as e:
        parse_axis_values(find_axis(axis), text, "y")
    assert t.seconds < 0.5  # well under 100 ms on a quiet machine
    assert e.value.field == "y_values" and e.value.status_code == 422
    assert f"{axis} axis (Y)" in str(e.value) and "at most 512 cells" in str(e.value)


# ---- 4. a non-finite weight gave a black image, a lone surrogate a 500 ------------------------------

@pytest.mark.parametrize("prompt,match", [
    ("(red:1e999)", "not a finite number"),
    ("(red:nan)", "not a finite number"),
    ("a red \ud800 circle", "lone surrogate"),
])
@pytest.mark.parametrize("field", ["prompt", "negative_prompt", "hr_prompt"])
def test_4_weights_and_unicode_are_refused_with_the_field(prompt, match, field):
    with timed() as t, pytest.raises(InvalidParameter, match=match) as e:
        check_prompt(prompt, field)
    assert e.value.field == field and e.value.status_code == 422 and t.seconds < 0.5
    # the parsers themselves never raise on it
    prompt_parser.get_learned_conditioning_prompt_schedules([prompt], 20)
    prompt_parser.parse_prompt_attention(prompt)


# ---- 5. png-info decoded whole images (13000x13000: 576 MB) and took any format ---------------------

def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def bomb_png(side: int = 13000, text: str = "a red circle\n" + INFOTEXT_TAIL) -> bytes:
    """A valid 1-bit side x side PNG of a few KB, its `parameters` after the pixels (read only on load by Pillow)."""
    row = b"\x00" * (1 + (side + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join([z.compress(row * 1000) for _ in range(side // 1000)] + [z.compress(row * (side % 1000)), z.flush()])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + png_chunk(b"IDAT", idat) + png_chunk(b"tEXt", b"parameters\0" + text.encode()) + png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return bomb_png()


def test_5_png_info_reads_text_without_decoding_pixels(bomb):
    tracemalloc.start()
    try:
        with timed() as t:
            text = images.read_image_text(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert text == {"parameters": "a red circle\n" + INFOTEXT_TAIL}
    assert t.seconds < 0.5 and peak < 10 * 2**20  # decoding it: 169,000,000 pixels
    with timed() as t, pytest.raises(InvalidParameter, match="13000x13000 pixels; at most 2048") as e:
        images.decode_image(bomb, "init_images")
    assert e.value.field == "init_images" and t.seconds < 0.5


def test_5_other_formats_are_refused_naming_the_accepted_ones():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "EPS")
    for data in (buf.getvalue(), b"GIF89a....", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"BM\0\0", b""):
        for call in (images.read_image_text, images.decode_image):
            with pytest.raises(InvalidParameter, match="PNG, JPEG or WebP") as e:
                call(data) if data else call(b"x")
            assert e.value.field == "image"


# ---- the image functions ------------------------------------------------------------------------------

def exif_with_comment(comment: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif[0x8769] = {0x9286: comment}
    return exif


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_text_of_png_jpeg_and_webp_as_automatic1111_reads_it():
    red = Image.new("RGB", (32, 24), (255, 0, 0))
    assert images.read_image_text(images.png_bytes(red, "p\n" + INFOTEXT_TAIL)) == {"parameters": "p\n" + INFOTEXT_TAIL}
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "猫 (犬:1.2)")  # not latin-1: an iTXt chunk
    info.add_text("comment", "z" * 5000, zip=True)  # zTXt
    info.add_itxt("title", "t", zip=True)
    assert images.read_image_text(encoded(red, "PNG", pnginfo=info)) == {
        "parameters": "猫 (犬:1.2)", "comment": "z" * 5000, "title": "t"}
    unicode = exif_with_comment(b"UNICODE\0" + "jpeg: 猫".encode("utf_16_be"))
    assert images.read_image_text(encoded(red, "JPEG", exif=unicode)) == {"parameters": "jpeg: 猫"}
    ascii_ = exif_with_comment(b"ASCII\0\0\0webp params")
    assert images.read_image_text(encoded(red, "WEBP", exif=ascii_)) == {"parameters": "webp params"}
    assert images.read_image_text(encoded(red, "JPEG")) == {}
    assert images.read_image_text(encoded(red, "WEBP", lossless=True)) == {}
    assert images.read_image_text(encoded(red, "JPEG", comment=b"from a COM segment")) == {
        "parameters": "from a COM segment"}


def test_compressed_text_bombs_are_refused():
    big = zlib.compress(b"a" * (images.MAX_TEXT_CHUNK + 10), 9)
    data = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + png_chunk(b"zTXt", b"parameters\0\0" + big) + png_chunk(b"IEND", b""))
    with timed() as t, pytest.raises(InvalidParameter, match="decompresses to more than 1 MB"):
        images.read_image_text(data)
    assert t.seconds < 0.5
    corrupt = data.replace(big[:20], b"\xff" * 20)
    with pytest.raises(InvalidParameter, match="corrupt"):
        images.read_image_text(corrupt)


@pytest.mark.parametrize("mode,fmt,want", [
    ("RGB", "PNG", "RGB"), ("RGBA", "PNG", "RGBA"), ("L", "PNG", "RGB"), ("P", "PNG", "RGB"), ("LA", "PNG", "RGBA"),
    ("I;16", "PNG", "RGB"), ("RGB", "JPEG", "RGB"), ("L", "JPEG", "RGB"), ("CMYK", "JPEG", "RGB"),
    ("RGB", "WEBP", "RGB"), ("RGBA", "WEBP", "RGBA"),
])
def test_decode_image_gives_loaded_rgb_or_rgba(mode, fmt, want):
    image = images.decode_image(encoded(Image.new(mode, (40, 30)), fmt))
    assert image.mode == want and image.size == (40, 30)
    image.getpixel((0, 0))  # loaded


def test_decode_image_checks_the_declared_size_first():
    wide = encoded(Image.new("RGB", (3000, 2)), "PNG")
    with pytest.raises(InvalidParameter, match="3000x2 pixels; at most 2048"):
        images.decode_image(wide)
    assert images.decode_image(wide, max_side=4096).size == (3000, 2)
    tall = encoded(Image.new("RGB", (2, 2100)), "JPEG")
    with pytest.raises(InvalidParameter, match="2x2100"):
        images.decode_image(tall, "mask")
    # A WebP whose header declares a 16383x16383 canvas (Pillow would allocate it when opening)
    frame = encoded(Image.new("RGB", (1, 1)), "WEBP", lossless=True)[12:]
    vp8x = bytes(4) + (16382).to_bytes(3, "little") * 2
    webp = b"RIFF" + struct.pack("<I", 4 + 18 + len(frame)) + b"WEBP" + b"VP8X" + struct.pack("<I", 10) + vp8x + frame
    tracemalloc.start()
    try:
        with pytest.raises(InvalidParameter, match="16383x16383"):
            images.decode_image(webp)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


def test_decode_image_refuses_broken_data_with_the_field():
    good = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "PNG")
    for data in (good[:60], good[:30], good[:8] + b"\0" * 30, encoded(Image.new("RGB", (64, 64)), "JPEG")[:200]):
        with pytest.raises(InvalidParameter) as e:
            images.decode_image(data, "init_images")
        assert e.value.field == "init_images"


def test_decode_image_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = images.decode_image(encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif))
    assert image.size == (20, 40)


def test_decode_base64_image_unwraps_data_uris_and_raw_base64():
    png = images.png_bytes(Image.new("RGB", (16, 8)), "x")
    b64 = base64.b64encode(png).decode()
    for text in (b64, "data:image/png;base64," + b64, b64.rstrip("="), "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))):
        assert images.decode_base64_image(text).size == (16, 8)
    assert images.decode_base64_bytes("  " + b64 + "\n") == png
    for text, match in [("https://example.com/a.png", "URLs are not accepted"), ("data:image/png,abc", "must be base64"),
                        ("not base64!", "not base64"), (b64[:40], "cannot decode|no size")]:
        with pytest.raises(InvalidParameter, match=match) as e:
            images.decode_base64_image(text, "init_images")
        assert e.value.field == "init_images"
    with pytest.raises(InvalidParameter, match="PNG, JPEG or WebP"):
        images.decode_base64_image(base64.b64encode(b"%!PS-Adobe-3.0 EPSF-3.0").decode())
