"""Text conditioning: a prompt of any length becomes CLIP hidden states, as AUTOMATIC1111 does it.

CLIP reads 77 tokens. To take longer prompts, the prompt's tokens are cut into chunks of
75; each chunk is encoded on its own as BOS + 75 tokens + EOS (padded with EOS, or with the
tokenizer's pad token after the first EOS for SD 2.x) and the chunks' hidden states are
concatenated, giving (1, 77 * k, C). `BREAK` closes a chunk early; near a chunk's end the
text after the last comma moves to the next chunk (AUTOMATIC1111's comma backtrack).
Emphasis `(word:1.2)` multiplies each token's hidden state by its weight and then restores
the chunk's mean, so emphasis changes direction rather than overall magnitude.

Textual-inversion embeddings (`modules/textual_inversion`): where a prompt's token ids spell
an embedding's name, its N vectors take the places of those tokens (placeholders with id 0 in
the chunk, and a `PromptChunkFix`); the vectors go in at the token-embedding layer, before the
transformer, through a forward hook for the duration of one encoder call. An embedding that
does not fit in what is left of the chunk moves whole to the next one (AUTOMATIC1111's rule);
one of more than 75 vectors starts a new chunk and fills as many as it needs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from modules import prompt_parser

CHUNK_LENGTH = 75


class PromptChunkFix(NamedTuple):
    """Vectors `first .. first + count` of `embedding` go at places `offset + 1 ..` of the 77-token chunk
    (offset counts from after BOS, as AUTOMATIC1111's `PromptChunkFix(offset, embedding)`)."""

    offset: int
    embedding: object
    first: int = 0
    count: int | None = None  # None: all the embedding's vectors

    def length(self) -> int:
        return int(self.embedding.vectors) - self.first if self.count is None else self.count


@dataclass
class PromptChunk:
    """One 77-token window: token ids with BOS/EOS, one weight per token, and the embeddings placed in it."""

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[PromptChunkFix] = field(default_factory=list)


class CLIPTextConditioner:
    """Encodes prompt texts with a transformers CLIP text encoder and its tokenizer.

    `clip_skip` n > 1 takes the n-th hidden state from the end and applies the final
    layer norm, as AUTOMATIC1111's "Clip skip" setting does.
    """

    def __init__(self, tokenizer, text_encoder, clip_skip: int = 1, comma_padding_backtrack: int = 20):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.clip_skip = clip_skip
        self.comma_padding_backtrack = comma_padding_backtrack
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.id_pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.id_end
        self.comma_token = tokenizer.get_vocab().get(",</w>")
        self.embedding_db = None  # a textual_inversion.EmbeddingDatabase, set by textual_inversion.attach
        self.embedding_key: str | None = None  # which part of an SDXL embedding this encoder reads
        self._hook_lock = threading.Lock()

    # -- tokens -------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        """Split a prompt into weighted 77-token chunks; also return the number of real tokens."""
        parsed = prompt_parser.parse_prompt_attention(line)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks: list[PromptChunk] = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def next_chunk(is_last: bool = False) -> None:
            nonlocal token_count, last_comma, chunk
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            to_add = CHUNK_LENGTH - len(chunk.tokens)
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * to_add + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * to_add + [1.0]
            last_comma = -1
            chunks.append(chunk)
            chunk = PromptChunk()

        db = self.embedding_db
        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (self.comma_padding_backtrack and len(chunk.tokens) == CHUNK_LENGTH and last_comma != -1
                      and len(chunk.tokens) - last_comma <= self.comma_padding_backtrack):
                    cut = last_comma + 1
                    moved_tokens, moved_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                    moved_fixes = [f._replace(offset=f.offset - cut) for f in chunk.fixes if f.offset >= cut]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    chunk.fixes = [f for f in chunk.fixes if f.offset < cut]
                    next_chunk()
                    chunk.tokens, chunk.multipliers, chunk.fixes = moved_tokens, moved_mults, moved_fixes
                if len(chunk.tokens) == CHUNK_LENGTH:
                    next_chunk()
                embedding, name_length = db.find_embedding_at_position(tokens, position) if db else (None, None)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                emb_len = int(embedding.vectors)
                if chunk.tokens and len(chunk.tokens) + emb_len > CHUNK_LENGTH:
                    next_chunk()  # it does not fit: the whole embedding moves to the next chunk
                first = 0
                while first < emb_len:  # more than 75 vectors: it fills chunks of its own
                    if len(chunk.tokens) == CHUNK_LENGTH:
                        next_chunk()
                    count = min(emb_len - first, CHUNK_LENGTH - len(chunk.tokens))
                    chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding, first, count))
                    chunk.tokens += [0] * count
                    chunk.multipliers += [weight] * count
                    first += count
                position += name_length

        if chunk.tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, token_count

    def count_tokens(self, text: str) -> tuple[int, int]:
        """(tokens used, tokens available in the chunks used): the UI's "12/75" counter."""
        chunks, count = self.tokenize_line(text)
        return count, max(len(chunks), 1) * CHUNK_LENGTH

    # -- hidden states ------------------------------------------------------------------
    @torch.no_grad()
    def encode_chunks(self, chunks: list[PromptChunk], clip_skip: int | None = None) -> torch.Tensor:
        """Encode chunks in one text-encoder call; returns (1, 77 * len(chunks), C)."""
        return self.encode_chunks_with_grad(chunks, clip_skip)

    def encode_chunks_with_grad(self, chunks: list[PromptChunk], clip_skip: int | None = None) -> torch.Tensor:
        """encode_chunks without no_grad: embedding training differentiates through it to the vectors."""
        device = self.text_encoder.device
        tokens = torch.tensor([c.tokens for c in chunks], dtype=torch.long, device=device)
        if self.id_pad != self.id_end:  # SD 2.x: everything after the first EOS is the pad token
            for row, chunk in zip(tokens, chunks):
                row[chunk.tokens.index(self.id_end) + 1:] = self.id_pad
        with self._hook_lock, self._embedding_vectors(chunks):
            z = self.encode_tokens(tokens, clip_skip or self.clip_skip)
        # z.device, not the encoder's: with CPU offload the weights rest on the CPU and z comes back on the GPU
        multipliers = torch.tensor([c.multipliers for c in chunks], dtype=z.dtype, device=z.device)
        if not torch.all(multipliers == 1):
            # Per chunk, so a text's encoding does not depend on what else is in the batch.
            original_mean = z.mean(dim=(1, 2), keepdim=True)
            z = z * multipliers[:, :, None]
            z = z * (original_mean / z.mean(dim=(1, 2), keepdim=True))
        return z.reshape(1, -1, z.shape[-1])

    def _embedding_vectors(self, chunks: list[PromptChunk]):
        """While the encoder runs, put each chunk's embedding vectors in the token-embedding layer's output."""
        import contextlib

        if not any(c.fixes for c in chunks):
            return contextlib.nullcontext()
        key = self.embedding_key

        def hook(module, args, output):
            rows = []
            for b, chunk in enumerate(chunks):
                row = output[b]
                if chunk.fixes:
                    parts, at = [], 0
                    for fix in sorted(chunk.fixes, key=lambda f: f.offset):
                        start, n = fix.offset + 1, fix.length()
                        vec = fix.embedding.vectors_for(key)[fix.first:fix.first + n]
                        parts += [row[at:start], vec.to(device=row.device, dtype=row.dtype)]
                        at = start + n
                    row = torch.cat(parts + [row[at:]])
                rows.append(row)
            return torch.stack(rows)

        return _hooked(self.text_encoder.get_input_embeddings(), hook)

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        out = self.text_encoder(input_ids=tokens, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            # transformers 5 flattened CLIPTextModel; 4.x keeps the layers under .text_model
            final_layer_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
            return final_layer_norm(out.hidden_states[-clip_skip])
        return out.last_hidden_state

    def encode(self, text: str, clip_skip: int | None = None) -> torch.Tensor:
        return self.encode_chunks(self.tokenize_line(text)[0], clip_skip)


class _hooked:
    """A forward hook on `module` for the duration of a `with` block."""

    def __init__(self, module: torch.nn.Module, hook):
        self.module, self.hook, self.handle = module, hook, None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


class _PenultimateCLIP(CLIPTextConditioner):
    """One of SDXL's two encoders: hidden state before the last layer, without the final layer norm
    (sgm's `layer: penultimate`, diffusers' `hidden_states[-2]`); CLIP skip n takes `hidden_states[-(n + 1)]`.
    Keeps the projected pooled output of the first chunk it encoded (AUTOMATIC1111 takes chunk 0's)."""

    pooled: torch.Tensor | None = None

    def encode_tokens(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        out = self.text_encoder(input_ids=tokens, output_hidden_states=True)
        self.pooled = out.text_embeds[0:1] if getattr(out, "text_embeds", None) is not None else None
        return out.hidden_states[-(max(clip_skip, 1) + 1)]


class SDXLTextConditioner:
    """SDXL base conditioning: both encoders read the same chunks (same BPE vocabulary; the second pads
    with `!` after the first EOS); their penultimate hidden states are concatenated along the channel
    (768 + 1280 = 2048) and the second encoder's pooled, projected embedding is the UNet's `text_embeds`.
    Emphasis and its mean restoration apply to each encoder's output separately, as in AUTOMATIC1111.

    `encode` returns {"crossattn": (1, 77 * k, C1 + C2), "vector": (1, D)}.
    """

    def __init__(self, tokenizer, text_encoder, tokenizer_2, text_encoder_2, clip_skip: int = 1):
        self.clip_l = _PenultimateCLIP(tokenizer, text_encoder, clip_skip=clip_skip)
        self.clip_g = _PenultimateCLIP(tokenizer_2, text_encoder_2, clip_skip=clip_skip)
        self.clip_l.embedding_key, self.clip_g.embedding_key = "clip_l", "clip_g"
        self.clip_skip = clip_skip

    @property
    def embedding_db(self):
        return self.clip_l.embedding_db

    @embedding_db.setter
    def embedding_db(self, db) -> None:
        # the chunks (and so the embeddings' places) come from clip_l's tokenization; both encoders read them
        self.clip_l.embedding_db = self.clip_g.embedding_db = db

    @property
    def tokenizer(self):
        return self.clip_l.tokenizer

    @property
    def text_encoder(self):
        return self.clip_l.text_encoder

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.clip_l.tokenize(texts)

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        return self.clip_l.tokenize_line(line)

    def count_tokens(self, text: str) -> tuple[int, int]:
        return self.clip_l.count_tokens(text)

    @torch.no_grad()
    def encode(self, text: str, clip_skip: int | None = None) -> dict[str, torch.Tensor]:
        from modules.conditioning import CondDict

        chunks, _ = self.clip_l.tokenize_line(text)
        z_l = self.clip_l.encode_chunks(chunks, clip_skip or self.clip_skip)
        z_g = self.clip_g.encode_chunks([PromptChunk(list(c.tokens), list(c.multipliers), list(c.fixes))
                                         for c in chunks], clip_skip or self.clip_skip)
        z_l = z_l.to(z_g.device, z_g.dtype)
        return CondDict(crossattn=torch.cat([z_l, z_g], dim=-1), vector=self.clip_g.pooled.to(z_g.dtype))
