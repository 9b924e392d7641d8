"""75-token chunks, BREAK, comma backtrack, emphasis with mean restoration, CLIP skip, SD 2.x padding."""
from __future__ import annotations

import copy

import torch

from modules.sd_hijack_clip import CLIPTextConditioner


def token_ids(cond_stage, text):
    return cond_stage.tokenize([text])[0]


def test_short_prompt_is_one_chunk_padded_with_eos(tiny_model):
    cs = tiny_model.cond_stage
    chunks, count = cs.tokenize_line("a red circle")
    assert count == 3 and len(chunks) == 1
    ids = token_ids(cs, "a red circle")
    assert chunks[0].tokens == [49406, *ids] + [49407] * (77 - 1 - len(ids))
    assert chunks[0].multipliers == [1.0] * 77


def test_empty_prompt_matches_plain_clip_encoding(tiny_model):
    cs = tiny_model.cond_stage
    ids = cs.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = cs.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(cs.encode(""), ref, rtol=0, atol=0)


def test_long_prompt_becomes_chunks_of_75(tiny_model):
    cs = tiny_model.cond_stage
    chunks, count = cs.tokenize_line(" ".join(["red"] * 160))
    assert count == 160 and len(chunks) == 3
    assert all(len(c.tokens) == 77 and c.tokens[0] == 49406 and c.tokens[-1] == 49407 for c in chunks)
    assert cs.encode(" ".join(["red"] * 160)).shape == (1, 231, 32)
    assert cs.count_tokens(" ".join(["red"] * 80)) == (80, 150)


def test_break_starts_a_new_chunk(tiny_model):
    cs = tiny_model.cond_stage
    chunks, _ = cs.tokenize_line("red BREAK blue")
    assert len(chunks) == 2
    red, blue = token_ids(cs, "red")[0], token_ids(cs, "blue")[0]
    assert chunks[0].tokens[:3] == [49406, red, 49407] and chunks[1].tokens[:3] == [49406, blue, 49407]


def test_comma_backtrack_moves_the_last_phrase_to_the_next_chunk(tiny_model):
    cs = tiny_model.cond_stage
    text = " ".join(["red"] * 70) + ", " + " ".join(["blue"] * 10)
    chunks, _ = cs.tokenize_line(text)
    blue = token_ids(cs, "blue")[0]
    comma = token_ids(cs, ",")[0]
    assert chunks[0].tokens[71] == comma and blue not in chunks[0].tokens
    assert chunks[1].tokens[1:11] == [blue] * 10


def test_emphasis_scales_tokens_and_restores_the_mean(tiny_model):
    cs = tiny_model.cond_stage
    plain, weighted = cs.encode("red circle"), cs.encode("(red:1.5) circle")
    torch.testing.assert_close(weighted.mean(), plain.mean(), rtol=1e-5, atol=1e-6)
    ratio = plain.mean() / (plain * torch.tensor([1.0, 1.5] + [1.0] * 75)[None, :, None]).mean()
    torch.testing.assert_close(weighted[0, 1], plain[0, 1] * 1.5 * ratio)
    torch.testing.assert_close(weighted[0, 2], plain[0, 2] * ratio)
    assert not torch.equal(weighted, plain)


def test_clip_skip_takes_an_earlier_layer_through_the_final_norm(tiny_model):
    cs = tiny_model.cond_stage
    ids = torch.tensor([cs.tokenize_line("red circle")[0][0].tokens])
    with torch.no_grad():
        out = cs.text_encoder(ids, output_hidden_states=True)
        ref = cs.text_encoder.final_layer_norm(out.hidden_states[-2])
    torch.testing.assert_close(cs.encode("red circle", clip_skip=2), ref, rtol=0, atol=0)
    assert not torch.equal(cs.encode("red circle", clip_skip=2), cs.encode("red circle"))


def test_sd2_padding_uses_the_pad_token_after_the_first_eos(tiny_model):
    tokenizer = copy.deepcopy(tiny_model.cond_stage.tokenizer)
    tokenizer.pad_token = "!"
    cs = CLIPTextConditioner(tokenizer, tiny_model.cond_stage.text_encoder)
    seen = []
    handle = cs.text_encoder.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].clone()),
                                                       with_kwargs=True)
    try:
        cs.encode("red circle")
    finally:
        handle.remove()
    ids = seen[0][0].tolist()
    assert ids[:4] == [49406, *token_ids(cs, "red circle"), 49407] and ids[4:] == [0] * 73
