"""Rebuild the CLIP BPE tokenizer files (vocab.json, merges.txt) offline.

Stable Diffusion checkpoints expect token ids from OpenAI's CLIP tokenizer, but no
model hub can be reached here. The `open_clip_torch` wheel on PyPI ships the same
BPE merges (`open_clip/bpe_simple_vocab_16e6.txt.gz`); the vocabulary is derived
from them exactly as CLIP's `SimpleTokenizer` does, so the ids match real checkpoints.

    pip download --no-deps open-clip-torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-3.3.0-py3-none-any.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/oc
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz OUT_DIR
"""
from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer uses this many merges


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode table (CLIP uses the same)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    special = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": {**special, "content": "<|startoftext|>"}, "eos_token": special,
        "pad_token": "<|endoftext|>", "unk_token": special}, indent=2))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "errors": "replace", "add_prefix_space": False}, indent=2))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bpe_gz", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    build(args.bpe_gz, args.out_dir)
