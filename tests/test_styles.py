"""Prompt styles (styles.csv), with AUTOMATIC1111's documented behaviour."""
from __future__ import annotations

import torch

from modules import processing, styles
from modules.styles import PromptStyle, StyleDatabase


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_merge_and_apply_as_automatic1111():
    assert styles.merge_prompts("masterpiece, {prompt}", "1girl") == "masterpiece, 1girl"
    assert styles.merge_prompts("masterpiece", "1girl, art by greg") == "1girl, art by greg, masterpiece"
    assert styles.merge_prompts("masterpiece", "") == "masterpiece"
    assert styles.merge_prompts("", "1girl") == "1girl"
    assert styles.merge_prompts("  best  ", "  a cat  ") == "a cat, best"
    assert styles.apply_styles_to_prompt("a cat", ["{prompt}, detailed", "by artist"]) == "a cat, detailed, by artist"


def test_extract_style_text_documented_examples():
    # the three examples of AUTOMATIC1111's docstring
    assert styles.extract_style_text_from_prompt("masterpiece", "1girl, art by greg, masterpiece") == \
        (True, "1girl, art by greg")
    assert styles.extract_style_text_from_prompt("masterpiece, {prompt}", "masterpiece, 1girl, art by greg") == \
        (True, "1girl, art by greg")
    assert styles.extract_style_text_from_prompt("masterpiece, {prompt}", "exquisite, 1girl, art by greg") == \
        (False, "exquisite, 1girl, art by greg")


def test_database_apply_and_extract_round_trip(tmp_path):
    f = write(tmp_path / "styles.csv", 'name,prompt,negative_prompt\n'
                                       'Cinematic,"cinematic still, {prompt}, film grain","cartoon, drawing"\n'
                                       'Clean,"sharp focus",blurry\n'
                                       'OnlyNeg,,"lowres, watermark"\n')
    db = StyleDatabase([f])
    assert list(db.styles) == ["Cinematic", "Clean", "OnlyNeg"]
    assert db.styles["Clean"] == PromptStyle("Clean", "sharp focus", "blurry", str(f))
    names = ["Cinematic", "Clean", "OnlyNeg"]
    prompt = db.apply_styles_to_prompt("a red circle", names)
    negative = db.apply_negative_styles_to_prompt("green", names)
    assert prompt == "cinematic still, a red circle, film grain, sharp focus"
    assert negative == "green, cartoon, drawing, blurry, lowres, watermark"
    assert db.extract_styles_from_prompt(prompt, negative) == (names, "a red circle", "green")
    # a style whose negative does not match is not taken off
    assert db.extract_styles_from_prompt("a cat, sharp focus", "nothing") == ([], "a cat, sharp focus", "nothing")
    # unknown names apply nothing (AUTOMATIC1111's no_style)
    assert db.apply_styles_to_prompt("a cat", ["Nope"]) == "a cat"
    assert db.prompt_styles() == [
        {"name": "Cinematic", "prompt": "cinematic still, {prompt}, film grain", "negative_prompt": "cartoon, drawing"},
        {"name": "Clean", "prompt": "sharp focus", "negative_prompt": "blurry"},
        {"name": "OnlyNeg", "prompt": "", "negative_prompt": "lowres, watermark"}]


def test_bad_lines_are_skipped_with_warnings_not_printed(tmp_path, capsys):
    f = write(tmp_path / "styles.csv", 'name,prompt,negative_prompt\n'
                                       'Good,a,b\n'
                                       'TooMany,a,b,c,d\n'
                                       ',no name,x\n'
                                       '# a comment,x,y\n'
                                       '"Broken,"x\n'
                                       'AlsoGood,c,\n')
    old = write(tmp_path / "old.csv", "name,text\nLegacy,old style text\n")
    headerless = write(tmp_path / "nohdr.csv", "Foo,bar,baz\n")
    db = StyleDatabase([f, old, headerless])
    assert "Good" in db.styles and "AlsoGood" in db.styles and db.styles["AlsoGood"].negative_prompt == ""
    assert db.styles["Legacy"] == PromptStyle("Legacy", "old style text", "", str(old))
    assert "TooMany" not in db.styles and "# a comment" not in db.styles
    text = "\n".join(db.warnings)
    assert "line 3" in text and "more columns" in text
    assert "no name" in text
    assert "nohdr.csv" in text and "header" in text
    assert capsys.readouterr().out == "" and capsys.readouterr().err == ""


def test_several_files_wildcards_and_atomic_save(tmp_path):
    a = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\nA,a-prompt,a-neg\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    b = write(extra / "one.csv", "name,prompt,negative_prompt\nB,b-prompt,b-neg\n")
    c = write(extra / "two.csv", "name,prompt,negative_prompt\nC,c-prompt,c-neg\nA,override,x\n")
    db = StyleDatabase([str(a), str(extra / "*.csv")])
    assert set(db.styles) == {"A", "B", "C"}
    assert db.styles["A"].path == str(c)  # a later file's style of the same name wins, as AUTOMATIC1111
    db.add_style("New", "n-prompt, {prompt}", "n-neg")
    db.delete_style("B")
    before_b = b.read_text(encoding="utf-8")
    written = db.save_styles()
    assert set(written) == {a, b, c}
    assert StyleDatabase([a]).styles.keys() == {"New"}  # new styles go to the first file; A moved to two.csv
    assert set(StyleDatabase([c]).styles) == {"C", "A"}
    assert StyleDatabase([b]).styles == {}  # its only style was deleted
    assert (extra / "one.csv.bak").read_text(encoding="utf-8") == before_b  # the old file is kept, as AUTOMATIC1111
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*"))
    # reading back gives the same database
    again = StyleDatabase([str(a), str(extra / "*.csv")])
    assert {k: (v.prompt, v.negative_prompt) for k, v in again.styles.items()} == \
        {k: (v.prompt, v.negative_prompt) for k, v in db.styles.items()}
    # one file for everything
    only = tmp_path / "all.csv"
    db.save_styles(only)
    assert set(StyleDatabase([only]).styles) == set(db.styles)
    # CSV quoting round-trips commas, quotes and newlines
    db.add_style("Tricky", 'a, "quoted", text\nsecond line', "x, y")
    db.save_styles(only)
    assert StyleDatabase([only]).styles["Tricky"].prompt == 'a, "quoted", text\nsecond line'


def test_missing_file_is_an_empty_database(tmp_path):
    db = StyleDatabase([tmp_path / "nothing-here.csv"])
    assert db.styles == {} and db.warnings == []
    db.add_style("X", "x", "")
    db.save_styles()
    assert StyleDatabase([tmp_path / "nothing-here.csv"]).styles["X"].prompt == "x"


class UncondRecorder:
    """Records the negative conditioning each job hands the CFG denoiser (nothing replaced)."""

    def __init__(self, monkeypatch):
        self.unconds = []
        original = processing.CFGDenoiser
        recorder = self

        class Recording(original):
            def __init__(self, model, cond, uncond, *args, **kwargs):
                recorder.unconds.append(uncond)
                super().__init__(model, cond, uncond, *args, **kwargs)

        monkeypatch.setattr(processing, "CFGDenoiser", Recording)


def test_a_styles_negative_reaches_the_uncond_conditioning(tiny_model, tmp_path, monkeypatch):
    f = write(tmp_path / "styles.csv", 'name,prompt,negative_prompt\n'
                                       'Clean,"{prompt}, sharp focus","blurry, lowres"\n'
                                       'Moody,dark,"bright, [sunny:cloudy:0.5]"\n')
    db = StyleDatabase([f])
    rec = UncondRecorder(monkeypatch)

    def job(prompt, negative, style_names=()):
        p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative, steps=4, seed=2,
                                                        width=64, height=64, do_not_save_samples=True,
                                                        styles=list(style_names))
        warnings = db.apply_to_job(p)
        return processing.process_images(tiny_model, p), warnings

    styled, warnings = job("a red circle", "green", ["Clean", "Moody", "Unknown"])
    assert warnings == ["Style not found: Unknown"]
    typed, _ = job("a red circle, sharp focus, dark", "green, blurry, lowres, bright, [sunny:cloudy:0.5]")
    plain, _ = job("a red circle, sharp focus, dark", "green")
    (s_uncond,), (t_uncond,), (p_uncond,) = rec.unconds[0], rec.unconds[1], rec.unconds[2]
    assert len(s_uncond) == len(t_uncond) == 2  # the style's prompt editing schedules the negative too
    for a, b in zip(s_uncond, t_uncond):
        assert a.end_at_step == b.end_at_step and torch.equal(a.cond, b.cond)
    assert not torch.equal(s_uncond[0].cond, p_uncond[0].cond)  # and it is not the same as without the style
    assert styled.all_negative_prompts == typed.all_negative_prompts
    assst = styled.infotexts[0].split("\n")
    assert assst[0] == "a red circle, sharp focus, dark"
    assert assst[1] == "Negative prompt: green, blurry, lowres, bright, [sunny:cloudy:0.5]"
    assert [im.tobytes() for im in styled.images] == [im.tobytes() for im in typed.images]
    # the styles were applied once: running the job again does not add them twice
    p = processing.StableDiffusionProcessingTxt2Img(prompt="x", negative_prompt="", styles=["Clean"])
    db.apply_to_job(p)
    db.apply_to_job(p)
    assert p.prompt == "x, sharp focus" and p.negative_prompt == "blurry, lowres"


def test_save_style_from_the_page_refuses_bad_names_and_writes_atomically(tmp_path, monkeypatch):
    """The page's "save the current prompt and negative prompt as a style": a name that cannot be saved is
    refused with the reason and nothing is written; a good one lands in the first file, read back equal."""
    import os

    f = write(tmp_path / "styles.csv", "name,prompt,negative_prompt\nOld,old text,\n")
    db = StyleDatabase([f])
    before = f.read_bytes()
    for name, why in (("", "needs a name"), ("   ", "needs a name"), ("#hidden", "start with #"),
                      ("two\nlines", "line breaks"), ("x" * 101, "at most 100"), ("None", "reserved")):
        try:
            db.save_style(name, "p", "n")
        except ValueError as e:
            assert why in str(e), (name, e)
        else:
            raise AssertionError(f"{name!r} was saved")
    assert f.read_bytes() == before and list(db.styles) == ["Old"]

    assert db.save_style("  Neg, \"quoted\"  ", "{prompt}, sharp", "blurry, circleness") == ('Neg, "quoted"', False)
    assert db.save_style("Old", "new text", "") == ("Old", True)
    again = StyleDatabase([f])
    assert again.styles['Neg, "quoted"'][1:3] == ("{prompt}, sharp", "blurry, circleness")
    assert again.styles["Old"].prompt == "new text" and not again.warnings
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # written through a renamed temporary

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)  # the file cannot be written: the database stays as it was
    try:
        db.save_style("Another", "x", "y")
    except OSError:
        pass
    assert "Another" not in db.styles and "Another" not in StyleDatabase([f]).styles
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_token_counter_counts_the_prompt_with_the_selected_styles(tiny_model, tmp_path):
    """The page's counters (AUTOMATIC1111's update_token_counter): a style that adds N tokens to the prompt
    or the negative prompt raises that box's count by N; a style that is not selected, or not known, adds none."""
    from webui.ui_common import token_counter

    db = StyleDatabase(write(tmp_path / "styles.csv", 'name,prompt,negative_prompt\n'
                                                      'Sharp,"{prompt}, sharp focus","blurry, lowres"\n'
                                                      'Frame,"photo of {prompt}, detailed",\n'))
    assert token_counter(tiny_model, "a red circle", 20, True, [], db) == "3/75"
    assert token_counter(tiny_model, "a red circle", 20, True, ["Sharp"], db) == "6/75"  # + ", sharp focus"
    both = token_counter(tiny_model, "a red circle", 20, True, ["Sharp", "Frame"], db)
    assert both == "10/75"  # + "photo of", ", detailed"
    assert token_counter(tiny_model, "a red circle", 20, True, ["Sharp"], None) == "3/75"  # the option off: no db
    assert token_counter(tiny_model, "a red circle", 20, True, ["Nope"], db) == "3/75"
    assert token_counter(tiny_model, "blue", 20, False, [], db) == "1/75"
    assert token_counter(tiny_model, "blue", 20, False, ["Sharp"], db) == "6/75"  # + ", blurry, low res"
    assert token_counter(tiny_model, "", 20, False, ["Sharp"], db) == "4/75"  # the style's own text
    assert token_counter(tiny_model, "blue", 20, False, ["Frame"], db) == "1/75"  # Frame has no negative
    # the counter counts what the job encodes: the job layer's expansion, token for token
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a red circle", negative_prompt="blue",
                                                    styles=["Sharp", "Frame"])
    db.apply_to_job(p)
    assert tiny_model.cond_stage.count_tokens(p.prompt) == (10, 75)
    assert tiny_model.cond_stage.count_tokens(p.negative_prompt) == (6, 75)
