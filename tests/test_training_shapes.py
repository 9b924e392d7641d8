"""Procedural shapes data for the tiny-shapes model: the pixel judge and the captions."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "training"))
import shapes as S  # noqa: E402


def test_render_is_deterministic_and_in_spec():
    a, attrs = S.render_example(123)
    b, attrs2 = S.render_example(123)
    assert a.dtype == np.uint8 and a.shape == (64, 64, 3)
    assert np.array_equal(a, b) and attrs == attrs2
    assert attrs["color"] in S.COLORS and attrs["shape"] in S.SHAPES and attrs["background"] in S.BACKGROUNDS
    assert 0.4 * 64 <= attrs["side"] <= 0.7 * 64
    assert 0 <= attrs["x"] and attrs["x"] + attrs["side"] <= 64
    assert 0 <= attrs["y"] and attrs["y"] + attrs["side"] <= 64
    # the corners are background (the object lies inside)
    assert tuple(a[0, 0]) == S.BACKGROUNDS[attrs["background"]] or attrs["x"] < 1 or attrs["y"] < 1


def test_judge_reads_back_rendered_examples():
    n, right, fills = 500, 0, {s: [] for s in S.SHAPES}
    for seed in range(10_000, 10_000 + n):
        img, a = S.render_example(seed)
        j = S.judge(img)
        fills[a["shape"]].append(j["fill"])
        right += (j["color"], j["shape"], j["background"]) == (a["color"], a["shape"], a["background"])
    assert right >= 0.99 * n
    assert abs(np.median(fills["circle"]) - np.pi / 4) < 0.05
    assert np.median(fills["square"]) > 0.95
    assert abs(np.median(fills["triangle"]) - 0.5) < 0.1


def test_judge_plain_background_has_no_object():
    img = np.full((64, 64, 3), S.BACKGROUNDS["gray"], np.uint8)
    j = S.judge(img)
    assert j["background"] == "gray" and j["color"] is None and j["shape"] is None


def test_captions_deterministic_and_varied():
    def caps(seed):
        rng = np.random.default_rng(seed)
        return [S.make_caption(S.render_example(i)[1], rng) for i in range(300)]

    c = caps(7)
    assert c == caps(7)
    assert c != caps(8)
    empty = sum(x == "" for x in c) / len(c)
    assert 0.05 < empty < 0.25
    assert any(x.startswith("a ") and x.endswith(" background") for x in c)   # sentences
    assert any("," in x for x in c)                                           # tag lists
    assert any(x in S.COLORS for x in c)                                      # a bare colour word
    assert any(" shape on a " in x for x in c)                                # shape dropped


def test_caption_words_match_attributes():
    rng = np.random.default_rng(0)
    attrs = dict(color="red", shape="circle", background="white")
    for _ in range(200):
        c = S.make_caption(attrs, rng)
        words = set(c.replace(",", " ").split())
        assert words <= {"a", "red", "circle", "shape", "on", "white", "background"}
    full = S.full_prompt("red", "circle", "white")
    assert full == "a red circle on a white background"


def test_caption_drop_is_per_attribute():
    """Colour always dropped, shape never, background always: only the shape word is left."""
    rng = np.random.default_rng(0)
    attrs = dict(color="red", shape="circle", background="white")
    caps = {S.make_caption(attrs, rng, p_drop=(1.0, 0.0, 1.0)) for _ in range(200)}
    assert caps == {"", "circle", "a circle"}
