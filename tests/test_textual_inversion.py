"""Textual-inversion embeddings: formats, shape checks, bad files, token matching, chunks, images, infotext."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from modules import images, processing, sd_models
from modules import textual_inversion as ti


def token_vectors(model, text: str) -> torch.Tensor:
    """The token embeddings (before the transformer) of `text`'s tokens: an embedding equal to the text."""
    cond = model.cond_stage
    ids = cond.tokenize([text])[0]
    return cond.text_encoder.get_input_embeddings().weight.detach()[ids].clone().float()


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return sd_models.load_model(tiny_model_dir, device="cpu")


@pytest.fixture()
def emb_dir(tmp_path) -> Path:
    d = tmp_path / "embeddings"
    d.mkdir()
    return d


def load(tiny_model_dir, folder):
    return sd_models.load_model(tiny_model_dir, device="cpu", embeddings_dir=folder)


def txt2img(model, prompt, negative="", seed=3, steps=4, **kw):
    p = processing.StableDiffusionProcessingTxt2Img(prompt=prompt, negative_prompt=negative, steps=steps, seed=seed,
                                                    width=64, height=64, do_not_save_samples=True, **kw)
    return processing.process_images(model, p)


def pixels(processed):
    return [np.asarray(im) for im in processed.images]


# -- formats ---------------------------------------------------------------------------------------------
def test_reads_automatic1111_formats(tiny_model_dir, base_model, emb_dir):
    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    v = torch.randn(3, width)
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "inside", "step": 7,
                "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "some-model"}, emb_dir / "a1111pt.pt")
    torch.save({"<concept>": v[0]}, emb_dir / "concept.bin")  # diffusers concept: one 1-D tensor
    from safetensors.torch import save_file

    save_file({"emb_params": v}, str(emb_dir / "embparams.safetensors"),
              metadata={"step": "12", "sd_checkpoint": "0123456789", "sd_checkpoint_name": "m"})
    sub = emb_dir / "sub" / "deeper"
    sub.mkdir(parents=True)
    save_file({"whatever": v[:2]}, str(sub / "single.safetensors"))
    model = load(tiny_model_dir, emb_dir)
    db = model.embedding_db
    assert set(db.loaded) == {"a1111pt", "concept", "embparams", "single"}, db.skipped
    assert db.loaded["a1111pt"].step == 7 and db.loaded["a1111pt"].sd_checkpoint == "abcdef0123"
    assert db.loaded["embparams"].step == 12 and db.loaded["embparams"].sd_checkpoint_name == "m"
    assert torch.equal(db.loaded["a1111pt"].vec, v) and db.loaded["concept"].vectors == 1
    assert db.loaded["single"].vectors == 2
    # GET /sdapi/v1/embeddings, exactly AUTOMATIC1111's shape
    api = ti.get_embeddings(model)
    assert set(api) == {"loaded", "skipped"} and api["skipped"] == {}
    assert api["loaded"]["a1111pt"] == {"step": 7, "sd_checkpoint": "abcdef0123", "sd_checkpoint_name": "some-model",
                                        "shape": width, "vectors": 3}
    assert list(api["loaded"]) == sorted(api["loaded"], key=str.lower)
    # AUTOMATIC1111's hash of an embedding: the file's sha256, 12 digits in the infotext
    import hashlib

    digest = hashlib.sha256((emb_dir / "a1111pt.pt").read_bytes()).hexdigest()
    assert db.loaded["a1111pt"].hash == digest and db.loaded["a1111pt"].shorthash == digest[:12]


def test_lcg_matches_automatic1111_reference():
    """AUTOMATIC1111's own test values of the generator that hides embeddings in images."""
    reference = [253, 242, 127, 44, 157, 27, 239, 133, 38, 79, 167, 4, 177, 95, 130, 79, 78, 14, 52, 215, 220, 194,
                 126, 28, 240, 179, 160, 153, 149, 50, 105, 14, 21, 218, 199, 18, 54, 198, 193, 38, 128, 19, 53, 195,
                 124, 75, 205, 12, 6, 145, 0, 28, 30, 148, 8, 45, 218, 171, 55, 249, 97, 166, 12, 35, 0, 41, 221, 122,
                 215, 170, 31, 113, 186, 97, 119, 31, 23, 185, 66, 140, 30, 41, 37, 63, 137, 109, 216, 55, 159, 145,
                 82, 204, 86, 73, 222, 44, 198, 118, 240, 97]
    stream = ti._lcg_bytes(100 + 100000)
    assert stream[:100].tolist() == reference
    assert int(stream[100:].astype(np.int64).sum()) == 12731374


def test_png_embeddings_text_chunk_and_pixels(tiny_model_dir, base_model, emb_dir):
    from PIL import Image, PngImagePlugin

    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    v = torch.randn(2, width, dtype=torch.float64).float()
    data = {"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "fromchunk", "step": 30,
            "sd_checkpoint": None, "sd_checkpoint_name": None}
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", ti.embedding_to_b64(data).decode())
    Image.new("RGB", (64, 64), (200, 100, 50)).save(emb_dir / "whatever-file-name.png", pnginfo=info)
    hidden = ti.insert_image_data_embed(Image.new("RGB", (64, 64), (90, 120, 200)), {**data, "name": "frompixels"})
    hidden.save(emb_dir / "pixels.png")
    assert ti.extract_image_data_embed(Image.open(emb_dir / "pixels.png"))["name"] == "frompixels"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(emb_dir / "just-a-picture.png")  # a preview: ignored
    Image.new("RGB", (64, 64), (10, 200, 10)).save(emb_dir / "fromchunk.preview.png")
    model = load(tiny_model_dir, emb_dir)
    db = model.embedding_db
    assert set(db.loaded) == {"fromchunk", "frompixels"} and not db.skipped
    assert db.loaded["fromchunk"].step == 30
    for name in ("fromchunk", "frompixels"):
        assert torch.allclose(db.loaded[name].vec, v, atol=1e-6)


# -- bad files ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_bad_files_are_skipped_with_reasons(tiny_model_dir, base_model, emb_dir, tmp_path):
    from safetensors.torch import save_file

    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    good = emb_dir / "good.safetensors"
    save_file({"emb_params": torch.randn(2, width)}, str(good))
    (emb_dir / "truncated.safetensors").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (emb_dir / "garbage.pt").write_bytes(b"\x80\x04this is not a pickle at all" * 10)
    torch.save({"string_to_param": {"*": torch.randn(2, width)}}, emb_dir / "cut.pt")
    (emb_dir / "cut.pt").write_bytes((emb_dir / "cut.pt").read_bytes()[:300])
    _Evil.marker = str(tmp_path / "pwned")
    with open(emb_dir / "evil.pt", "wb") as f:
        pickle.dump({"string_to_param": {"*": torch.zeros(1, width)}, "payload": _Evil()}, f)
    torch.save({"string_to_param": {"*": torch.randn(1, width), "#": torch.randn(1, width)}}, emb_dir / "two.pt")
    save_file({"emb_params": torch.full((2, width), float("nan"))}, str(emb_dir / "nan.safetensors"))
    torch.save({"hello": "world"}, emb_dir / "notanembedding.pt")
    (emb_dir / "empty.pt").write_bytes(b"")  # empty files are passed over, as AUTOMATIC1111 does
    (emb_dir / "notes.txt").write_text("not an embedding")
    model = load(tiny_model_dir, emb_dir)
    db = model.embedding_db
    assert set(db.loaded) == {"good"}
    reasons = {k: v.reason for k, v in db.skipped.items()}
    assert set(reasons) == {"truncated", "garbage", "cut", "evil", "two", "nan", "notanembedding"}, reasons
    assert "safetensors" in reasons["truncated"] and "corrupt" in reasons["truncated"]
    assert "refused" in reasons["evil"] and "code" in reasons["evil"]
    assert not Path(_Evil.marker).exists()  # the pickle's code never ran
    assert "multiple terms" in reasons["two"]
    assert "NaN" in reasons["nan"]
    assert "neither" in reasons["notanembedding"]
    # listed in the API's skipped dict, with the same keys as the loaded entries; reasons on request
    api = db.api_dict()
    assert set(api["skipped"]) == set(reasons)
    assert all(set(e) == {"step", "sd_checkpoint", "sd_checkpoint_name", "shape", "vectors"}
               for e in api["skipped"].values())
    assert db.api_dict(include_reasons=True)["skipped"]["evil"]["reason"] == reasons["evil"]
    json.dumps(api)


def test_wrong_shapes_skipped_and_listed(tiny_model_dir, base_model, emb_dir):
    from safetensors.torch import save_file

    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(emb_dir / "sdxl-emb.safetensors"))
    save_file({"emb_params": torch.randn(2, 768)}, str(emb_dir / "sd15-emb.safetensors"))
    save_file({"emb_params": torch.randn(2, width)}, str(emb_dir / "fits.safetensors"))
    model = load(tiny_model_dir, emb_dir)
    db = model.embedding_db
    assert set(db.loaded) == {"fits"}
    assert "SDXL" in db.skipped["sdxl-emb"].reason
    assert "768" in db.skipped["sd15-emb"].reason and str(width) in db.skipped["sd15-emb"].reason
    api = db.api_dict()["skipped"]
    assert api["sdxl-emb"] == {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 2048,
                               "vectors": 2}
    assert api["sd15-emb"]["shape"] == 768
    # the name of a skipped embedding is plain text in a prompt
    assert not any(c.fixes for c in model.cond_stage.tokenize_line("sd15-emb")[0])


# -- token matching and chunks -------------------------------------------------------------------------
def test_longest_match_first(tiny_model_dir, base_model, emb_dir):
    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    ti.save_embedding(ti.Embedding("zorp", torch.randn(1, width)), emb_dir / "zorp.safetensors")
    ti.save_embedding(ti.Embedding("zorp blat", torch.randn(3, width)), emb_dir / "zorp blat.safetensors")
    model = load(tiny_model_dir, emb_dir)
    chunks, count = model.cond_stage.tokenize_line("a zorp blat and a zorp")
    fixes = chunks[0].fixes
    assert [(f.embedding.name, f.offset) for f in fixes] == [("zorp blat", 1), ("zorp", 6)]
    assert count == 1 + 3 + 2 + 1  # the token counter counts the vectors, not the name's tokens
    assert model.cond_stage.count_tokens("a zorp blat and a zorp") == (7, 75)
    # the UI's counter (AUTOMATIC1111's update_token_counter): tags left out, the longest schedule counted, styles in
    from modules import extra_networks
    from modules.styles import StyleDatabase

    assert extra_networks.count_prompt_tokens(model, "a zorp blat <lora:x:1>") == (4, 75)
    assert extra_networks.count_prompt_tokens(model, "[zorp blat:a:0.5] AND zorp") == (3, 75)
    styles_csv = tiny_model_dir.parent / "count-styles.csv"
    styles_csv.write_text("name,prompt,negative_prompt\nS,\"{prompt}, zorp blat\",zorp\n")
    db = StyleDatabase([styles_csv])
    assert extra_networks.count_prompt_tokens(model, "a", styles=["S"], style_db=db) == (1 + 1 + 3, 75)
    assert extra_networks.count_prompt_tokens(model, "a", styles=["S"], style_db=db, is_positive=False) == (3, 75)


def test_embedding_moves_whole_to_the_next_chunk(tiny_model_dir, base_model, emb_dir):
    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    ti.save_embedding(ti.Embedding("tenvec", torch.randn(10, width)), emb_dir / "tenvec.safetensors")
    ti.save_embedding(ti.Embedding("eightyvec", torch.randn(80, width)), emb_dir / "eightyvec.safetensors")
    model = load(tiny_model_dir, emb_dir)
    cond = model.cond_stage
    # 70 words, then 10 vectors: they do not fit in the 5 places left, so they all go to chunk 2
    chunks, count = cond.tokenize_line(" ".join(["cat"] * 70) + " tenvec")
    assert len(chunks) == 2 and not chunks[0].fixes
    assert chunks[0].tokens[71:] == [cond.id_end] * 6
    assert [(f.offset, f.first, f.length()) for f in chunks[1].fixes] == [(0, 0, 10)]
    assert chunks[1].tokens[1:11] == [0] * 10 and chunks[1].tokens[11] == cond.id_end
    assert count == 75 + 10
    # 80 vectors cannot share a chunk with anything: a new chunk, filled, and the rest in the next
    chunks, count = cond.tokenize_line("a photo of eightyvec cat")
    assert len(chunks) == 3
    assert chunks[0].tokens[1:4] == cond.tokenize(["a photo of"])[0] and chunks[0].tokens[4] == cond.id_end
    assert not chunks[0].fixes
    assert [(f.offset, f.first, f.length()) for f in chunks[1].fixes] == [(0, 0, 75)]
    assert chunks[1].tokens == [cond.id_start] + [0] * 75 + [cond.id_end]
    assert [(f.offset, f.first, f.length()) for f in chunks[2].fixes] == [(0, 75, 5)]
    assert chunks[2].tokens[1:7] == [0] * 5 + cond.tokenize(["cat"])[0]
    assert count == 75 + 75 + 6
    z = cond.encode("a photo of eightyvec cat")
    assert z.shape == (1, 3 * 77, width)
    # every one of the 80 vectors went in: chunk 2 differs from the same chunk with zeros in their places
    zeros = ti.Embedding("eightyvec", torch.zeros(80, width))
    model.embedding_db.loaded["eightyvec"].vec, saved = zeros.vec, model.embedding_db.loaded["eightyvec"].vec
    try:
        z0 = cond.encode("a photo of eightyvec cat")
    finally:
        model.embedding_db.loaded["eightyvec"].vec = saved
    assert not torch.equal(z[:, 77:154], z0[:, 77:154]) and not torch.equal(z[:, 154:], z0[:, 154:])
    assert torch.equal(z[:, :77], z0[:, :77])


def test_embedding_of_a_words_tokens_gives_the_words_image(tiny_model_dir, base_model, emb_dir):
    """Bit for bit, in the prompt and in the negative prompt, with emphasis."""
    ti.save_embedding(ti.Embedding("zqxword", token_vectors(base_model, "red circle")), emb_dir / "zqxword.safetensors")
    off = token_vectors(base_model, "red circle")
    off[0, 0] += 0.5
    ti.save_embedding(ti.Embedding("zqxoff", off), emb_dir / "zqxoff.safetensors")
    model = load(tiny_model_dir, emb_dir)
    assert "zqxword" in model.embedding_db.loaded
    word = txt2img(model, "a (red circle:1.3) on a table", "red circle, blurry", batch_size=2)
    emb = txt2img(model, "a (zqxword:1.3) on a table", "zqxword, blurry", batch_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(word), pixels(emb)))
    # the test can fail: slightly different vectors give a different image
    other = txt2img(model, "a (zqxoff:1.3) on a table", "zqxoff, blurry", batch_size=2)
    assert not all(np.array_equal(a, b) for a, b in zip(pixels(word), pixels(other)))
    # and the conditioning itself, before sampling
    assert torch.equal(model.cond_stage.encode("(zqxword:1.3)"), model.cond_stage.encode("(red circle:1.3)"))


def test_ti_hashes_in_infotext(tiny_model_dir, base_model, emb_dir):
    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    ti.save_embedding(ti.Embedding("used-one", torch.randn(2, width)), emb_dir / "used-one.safetensors")
    ti.save_embedding(ti.Embedding("negemb", torch.randn(2, width)), emb_dir / "negemb.safetensors")
    ti.save_embedding(ti.Embedding("unused", torch.randn(2, width)), emb_dir / "unused.safetensors")
    model = load(tiny_model_dir, emb_dir)
    db = model.embedding_db
    res = txt2img(model, "a used-one cat", "negemb")
    params = images.parse_generation_parameters(res.infotexts[0])
    assert params["TI hashes"] == f"used-one: {db.loaded['used-one'].shorthash}, negemb: {db.loaded['negemb'].shorthash}"
    assert f'TI hashes: "used-one: {db.loaded["used-one"].shorthash}, negemb:' in res.infotexts[0]
    assert "unused" not in res.infotexts[0]
    assert images.parse_hashes(params["TI hashes"]) == {"used-one": db.loaded["used-one"].shorthash,
                                                        "negemb": db.loaded["negemb"].shorthash}
    assert res.extra_generation_params["TI hashes"] == params["TI hashes"]  # the API's info too
    plain = txt2img(model, "a cat", "")
    assert "TI hashes" not in plain.infotexts[0]


def test_reload_when_folder_changes_and_on_switch(tiny_model_dir, base_model, emb_dir, tmp_path):
    from tests.tiny_checkpoints import build_models, save_folder

    width = base_model.cond_stage.text_encoder.get_input_embeddings().weight.shape[1]
    model = load(tiny_model_dir, emb_dir)
    assert model.embedding_db.loaded == {}
    assert model.embedding_db.load_if_changed(model) is False
    ti.save_embedding(ti.Embedding("later", torch.randn(1, width)), emb_dir / "later.safetensors")
    txt2img(model, "later", steps=1)  # a job re-reads a folder that changed, as AUTOMATIC1111 does
    assert "later" in model.embedding_db.loaded
    assert model.embedding_db.load_if_changed(model) is False
    # SDXL: an SD 1.x embedding is skipped, an SDXL one loads; switching models reloads for the new encoders
    unet, vae, te, sched = build_models("sdxl")
    xl_dir = save_folder(tmp_path / "xl", unet, vae, te, sched)
    ids = model.cond_stage.tokenize(["blue square"])[0]
    vec = {"clip_l": te[0].get_input_embeddings().weight.detach()[ids].clone(),
           "clip_g": te[1].get_input_embeddings().weight.detach()[ids].clone()}
    ti.save_embedding(ti.Embedding("xlword", vec), emb_dir / "xlword.safetensors")
    xl = sd_models.switch_model(model, xl_dir, device="cpu", embeddings_dir=emb_dir)
    assert set(xl.embedding_db.loaded) == {"xlword"} and "later" in xl.embedding_db.skipped
    assert "SDXL" in xl.embedding_db.skipped["later"].reason
    # each SDXL encoder reads its own part: the embedding equals the words it was made of
    a, b = xl.cond_stage.encode("a xlword"), xl.cond_stage.encode("a blue square")
    assert torch.equal(a["crossattn"], b["crossattn"]) and torch.equal(a["vector"], b["vector"])


def test_create_embedding(tiny_model_dir, emb_dir):
    model = load(tiny_model_dir, emb_dir)
    path = ti.create_embedding(model, "new/emb!", 3, init_text="red circle")
    assert path.name == "newemb.safetensors"
    e = model.embedding_db.loaded["newemb"]
    want = token_vectors(model, "red circle")
    assert e.vectors == 3 and e.step == 0
    assert torch.equal(e.vec[0], want[0]) and torch.equal(e.vec[2], want[1])  # i * 2 // 3 -> tokens 0, 0, 1
    with pytest.raises(FileExistsError):
        ti.create_embedding(model, "newemb", 1)
