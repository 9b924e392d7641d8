"""The Extra networks panel's cards (webui/ui_extra_networks.py), rendered from a real model's embeddings and a
LoRA folder: what a click inserts, previews beside the files (damaged ones left out), skipped embeddings listed."""
from __future__ import annotations

import html
import re
import struct
import zlib

import torch
from PIL import Image

from modules import sd_models
from modules import textual_inversion as ti
from webui import ui_extra_networks as en


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header that declares a huge image (a decompression bomb), with no real pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


def test_cards_for_embeddings_and_loras_with_previews(tiny_model_dir, tmp_path):
    emb_dir, lora_dir = tmp_path / "embeddings", tmp_path / "Lora"
    (emb_dir / "sub").mkdir(parents=True)
    lora_dir.mkdir()
    ti.save_embedding(ti.Embedding("good", torch.randn(3, 32)), emb_dir / "good.safetensors")
    Image.new("RGB", (400, 100), (0, 0, 255)).save(emb_dir / "good.png")  # <name>.png beside the file
    ti.save_embedding(ti.Embedding("a&b", torch.randn(1, 32)), emb_dir / "sub" / "a&b.safetensors")
    (emb_dir / "sub" / "a&b.preview.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # damaged: no preview
    ti.save_embedding(ti.Embedding("wide", torch.zeros(1, 768)), emb_dir / "wide.safetensors")
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 4)}, str(lora_dir / "detail.safetensors"),
              metadata={"ss_output_name": "detail-alias"})
    (lora_dir / "detail.preview.png").write_bytes(png_claiming(100_000, 100_000))  # a bomb: refused, not decoded
    model = sd_models.load_model(tiny_model_dir, device="cpu", embeddings_dir=emb_dir, lora_dir=lora_dir)

    previews = en.PreviewCache()
    cards, skipped = en.embedding_cards(model, previews)
    by_name = {c.name: c for c in cards}
    assert sorted(by_name) == ["a&b", "good"]
    assert by_name["good"].prompt == "good" and by_name["good"].allow_negative and "3 vectors" in by_name["good"].description
    assert by_name["good"].preview.startswith("data:image/jpeg;base64,") and by_name["a&b"].preview is None
    assert [name for name, _ in skipped] == ["wide"] and "768" in skipped[0][1]
    loras = en.lora_cards(lora_dir, previews)
    assert [(c.name, c.prompt, c.allow_negative, c.preview) for c in loras] == [
        ("detail", "<lora:detail:1>", False, None)]
    assert "detail-alias" in loras[0].search

    markup = en.cards_html(cards, "none", skipped)
    assert 'data-prompt="a&amp;b"' in markup and "a&b\"" not in markup  # names are escaped
    assert re.findall(r'class="card" data-name="([^"]+)"', markup) == ["a&amp;b", "good"]
    assert "Skipped for this model" in markup and html.escape(skipped[0][1]) in markup
    assert en.cards_html([], "No LoRA files in x") == '<div class="sdneg-cards-empty">No LoRA files in x</div>'
    assert en.find_preview(emb_dir / "good.safetensors") == emb_dir / "good.png"
    assert previews.uri(emb_dir / "good.png") is by_name["good"].preview  # made once per file version
