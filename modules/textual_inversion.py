"""Textual-inversion embeddings: the `embeddings/` folder, read as AUTOMATIC1111 reads it.

An embedding is N learned vectors that stand in the prompt where its name is written: the
name is matched on token ids (longest match first, AUTOMATIC1111's
`find_embedding_at_position`), and `sd_hijack_clip` puts the vectors in the places of the
name's tokens, before the text encoder's transformer layers. Used in the negative prompt,
an embedding is a "negative embedding": a learned direction to steer away from.

Files, in AUTOMATIC1111's formats (subfolders are walked; the name is the file's stem):
- `.pt` / `.bin`: a dict with `string_to_param` (`{"*": (N, C)}`) and `name`, `step`,
  `sd_checkpoint`, `sd_checkpoint_name`; or a diffusers concept (one tensor). Read with
  `torch.load(weights_only=True)`: a pickle that holds anything but tensors and plain data
  (code, classes) is refused, with the reason, and never run.
- `.safetensors`: `emb_params` or any single tensor (SD 1.x/2.x), or `clip_l` + `clip_g`
  (SDXL); the header's metadata may carry `name`, `step`, `sd_checkpoint`, `sd_checkpoint_name`.
- `.png` / `.webp` / `.jxl` / `.avif`: the data AUTOMATIC1111's trainer hides in its preview
  images, either as the `sd-ti-embedding` text chunk (base64 JSON) or in the pixels of the two
  side blocks (`insert_image_data_embed`). JSON, never a pickle. Images without such data are
  previews and are ignored, as is `name.preview.png`.

Each file's width is checked against the loaded model's text encoder(s); one that does not
fit (an SDXL embedding under an SD 1.x model, a 768-wide one under a 64-wide encoder) is
listed as skipped with the reason, and so is a corrupt, truncated or refused file: loading a
folder never raises for a bad file.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")
TENSOR_SUFFIXES = (".pt", ".bin", ".safetensors")
EMBEDDING_SUFFIXES = TENSOR_SUFFIXES + IMAGE_SUFFIXES


class EmbeddingError(Exception):
    """A file that is not a usable embedding; the message is the reason shown in the skipped list."""


@dataclass
class Embedding:
    """One embedding: `vec` is (N, C) for SD 1.x/2.x, or {"clip_l": (N, 768), "clip_g": (N, 1280)} for SDXL.

    `shape` is the vector width as AUTOMATIC1111 reports it (SDXL: the sum of both widths) and
    `vectors` the number of vectors N, i.e. how many token places it takes in a prompt.
    """

    name: str
    vec: torch.Tensor | dict[str, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    filename: str | None = None
    hash: str | None = None  # sha256 of the file

    @property
    def vectors(self) -> int:
        v = self.vec["clip_g"] if isinstance(self.vec, dict) else self.vec
        return int(v.shape[0])

    @property
    def shape(self) -> int:
        if isinstance(self.vec, dict):
            return int(self.vec["clip_g"].shape[-1] + self.vec["clip_l"].shape[-1])
        return int(self.vec.shape[-1])

    @property
    def shorthash(self) -> str | None:
        """AUTOMATIC1111's short hash of an embedding: the first 12 hex digits of the file's sha256."""
        return self.hash[:12] if self.hash else None

    def vectors_for(self, key: str | None) -> torch.Tensor:
        """The vectors one text encoder reads: `key` is None for SD 1.x/2.x, "clip_l" / "clip_g" for SDXL."""
        if isinstance(self.vec, dict):
            return self.vec[key or "clip_l"]
        return self.vec

    def api_dict(self) -> dict:
        """One entry of AUTOMATIC1111's GET /sdapi/v1/embeddings."""
        return {"step": self.step, "sd_checkpoint": self.sd_checkpoint, "sd_checkpoint_name": self.sd_checkpoint_name,
                "shape": self.shape, "vectors": self.vectors}


@dataclass
class SkippedEmbedding:
    """A file that was not loaded, and why. `embedding` is set when the file was readable (wrong shape)."""

    name: str
    path: str
    reason: str
    embedding: Embedding | None = None

    def api_dict(self) -> dict:
        if self.embedding is not None:
            return self.embedding.api_dict()
        return {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}


# -- AUTOMATIC1111's embedding-in-an-image format -------------------------------------------------
class _EmbeddingEncoder(json.JSONEncoder):
    def default(self, obj):
        if isinstance(obj, torch.Tensor):
            return {"TORCHTENSOR": obj.detach().cpu().numpy().tolist()}
        return json.JSONEncoder.default(self, obj)


def _decode_tensors(d: dict):
    if "TORCHTENSOR" in d:
        return torch.from_numpy(np.array(d["TORCHTENSOR"]))
    return d


def embedding_to_b64(data: dict) -> bytes:
    """The `sd-ti-embedding` PNG text chunk: base64 of the JSON of the .pt dict, tensors as {"TORCHTENSOR": lists}."""
    return base64.b64encode(json.dumps(data, cls=_EmbeddingEncoder).encode())


def embedding_from_b64(data: str | bytes) -> dict:
    return json.loads(base64.b64decode(data), object_hook=_decode_tensors)


def _lcg_bytes(n: int) -> np.ndarray:
    """AUTOMATIC1111's `lcg()` stream (m=2**32, a=1664525, c=1013904223, seed 0, each value % 255), n values."""
    out = np.empty(n, dtype=np.uint8)
    seed = 0
    for i in range(n):
        seed = (1664525 * seed + 1013904223) % 4294967296
        out[i] = seed % 255
    return out


def _xor_block(block: np.ndarray) -> np.ndarray:
    rand = _lcg_bytes(int(np.prod(block.shape))).reshape(block.shape)
    return np.bitwise_xor(block.astype(np.uint8), rand & 0x0F)


def _style_block(block: np.ndarray, sequence) -> np.ndarray:
    """The dotted pattern in the high nibbles that makes the data blocks look like a texture (ignored when read)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (block.shape[1], block.shape[0]))
    draw = ImageDraw.Draw(im)
    i = 0
    for x in range(-6, im.size[0], 8):
        for yi, y in enumerate(range(-6, im.size[1], 8)):
            offset = 4 if yi % 2 == 0 else 0
            shade = int(sequence[i % len(sequence)])
            i += 1
            draw.ellipse((x + offset, y, x + 6 + offset, y + 6), fill=(shade, shade, shade))
    fg = np.array(im).astype(np.uint8) & 0xF0
    return block ^ fg


def insert_image_data_embed(image, data: dict):
    """AUTOMATIC1111's picture of an embedding: the zlib-compressed JSON split into low and high nibbles, laid
    out as two blocks left and right of `image` (separated by a black column each), xor-ed with its LCG."""
    from PIL import Image

    d = 3
    compressed = zlib.compress(json.dumps(data, cls=_EmbeddingEncoder).encode(), level=9)
    raw = np.frombuffer(compressed, np.uint8).copy()
    high, low = raw >> 4, raw & 0x0F
    h = image.size[1]
    next_size = low.shape[0] + (h - (low.shape[0] % h))
    next_size = next_size + ((h * d) - (next_size % (h * d)))
    low = np.resize(low, next_size).reshape((h, -1, d))
    high = np.resize(high, next_size).reshape((h, -1, d))
    first = next(iter(data["string_to_param"].values()))
    edge = first.detach().cpu().float().numpy().reshape(first.shape[0], -1)[0][:1024]
    edge = (np.abs(edge) / max(float(np.max(np.abs(edge))), 1e-12) * 255).astype(np.uint8)
    low = _xor_block(_style_block(low, edge))
    high = _xor_block(_style_block(high, edge[::-1]))
    im_low, im_high = Image.fromarray(low, mode="RGB"), Image.fromarray(high, mode="RGB")
    out = Image.new("RGB", (image.size[0] + im_low.size[0] + im_high.size[0] + 2, image.size[1]), (0, 0, 0))
    out.paste(im_low, (0, 0))
    out.paste(image.convert("RGB"), (im_low.size[0] + 1, 0))
    out.paste(im_high, (im_low.size[0] + 1 + image.size[0] + 1, 0))
    return out


def _crop_black(img: np.ndarray, tol: int = 0) -> np.ndarray:
    mask = (img > tol).all(2)
    mask0, mask1 = mask.any(0), mask.any(1)
    col_start, col_end = mask0.argmax(), mask.shape[1] - mask0[::-1].argmax()
    row_start, row_end = mask1.argmax(), mask.shape[0] - mask1[::-1].argmax()
    return img[row_start:row_end, col_start:col_end]


def extract_image_data_embed(image) -> dict | None:
    """The embedding hidden in an image's pixels by `insert_image_data_embed`, or None for a plain picture."""
    arr = np.array(image.convert("RGB"), dtype=np.uint8)
    out = _crop_black(arr) & 0x0F
    black_cols = np.where(np.sum(out, axis=(0, 2)) == 0)[0]
    if black_cols.shape[0] < 2:
        return None
    lower = _xor_block(out[:, :black_cols.min(), :].astype(np.uint8))
    upper = _xor_block(out[:, black_cols.max() + 1:, :].astype(np.uint8))
    block = ((upper << 4) | lower).flatten().tobytes()
    try:
        # the blocks are padded by repetition: decompressobj stops at the end of the zlib stream
        return json.loads(zlib.decompressobj().decompress(block), object_hook=_decode_tensors)
    except (zlib.error, ValueError, UnicodeDecodeError):
        return None


# -- reading one file -----------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_pickle(path: Path):
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise EmbeddingError("refused: the pickle holds more than tensors and plain data (it could run code); "
                                 f"only torch.load(weights_only=True) files are read ({text.splitlines()[0][:200]})")
        raise EmbeddingError(f"not a readable torch file (truncated or corrupt?): {type(e).__name__}: "
                             f"{text.splitlines()[0][:200] if text else ''}")


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            data = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise EmbeddingError(f"not a readable .safetensors file (truncated or corrupt?): {type(e).__name__}: {e}")
    return data, metadata


def _read_image(path: Path) -> dict | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            text = getattr(im, "text", None) or {}
            if "sd-ti-embedding" in text:
                return embedding_from_b64(text["sd-ti-embedding"])
            return extract_image_data_embed(im)
    except EmbeddingError:
        raise
    except Exception as e:
        raise EmbeddingError(f"not a readable image embedding: {type(e).__name__}: {e}")


def _int_or_none(v):
    try:
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return None


def _str_or_none(v):
    return None if v is None or v == "" or v == "None" else str(v)


def _as_matrix(t, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise EmbeddingError(f"{what} is a {type(t).__name__}, not a tensor")
    if not (t.is_floating_point() or t.dtype in (torch.float64,)):
        raise EmbeddingError(f"{what} has dtype {t.dtype}, not floating point")
    t = t.detach()
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise EmbeddingError(f"{what} has shape {tuple(t.shape)}; expected (vectors, width)")
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise EmbeddingError(f"{what} holds NaN or infinite values")
    return t


def embedding_from_data(data, name: str, metadata: dict | None = None) -> Embedding:
    """A loaded dict (any of the formats above) -> Embedding, or EmbeddingError with the reason."""
    metadata = metadata or {}
    if not isinstance(data, dict) or not data:
        raise EmbeddingError(f"holds a {type(data).__name__}, not an embedding dict")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # torch 1.11 ParameterDict
        if not isinstance(params, dict) or len(params) != 1:
            raise EmbeddingError("embedding file has multiple terms in it" if isinstance(params, dict)
                                 else "string_to_param is not a dict")
        vec = _as_matrix(next(iter(params.values())), "string_to_param")
    elif "clip_g" in data and "clip_l" in data:  # SDXL
        vec = {k: _as_matrix(data[k], k) for k in ("clip_l", "clip_g")}
        if vec["clip_l"].shape[0] != vec["clip_g"].shape[0]:
            raise EmbeddingError(f"clip_l has {vec['clip_l'].shape[0]} vectors and clip_g {vec['clip_g'].shape[0]}")
    else:
        tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
        if not tensors or not isinstance(next(iter(data.values())), torch.Tensor):
            raise EmbeddingError("neither a textual inversion embedding (string_to_param, emb_params, clip_l+clip_g) "
                                 "nor a diffusers concept (one tensor)")
        if len(data) != 1 and "emb_params" not in data:
            raise EmbeddingError("embedding file has multiple terms in it")
        vec = _as_matrix(data["emb_params"] if "emb_params" in data else tensors[0], "the embedding tensor")
    def get(key):
        value = data.get(key)
        return value if value is not None else metadata.get(key)

    # the name is the file's (as AUTOMATIC1111 does for tensor files): renaming the file renames the embedding
    return Embedding(name=name, vec=vec, step=_int_or_none(get("step")), sd_checkpoint=_str_or_none(get("sd_checkpoint")),
                     sd_checkpoint_name=_str_or_none(get("sd_checkpoint_name")))


def load_embedding_file(path: str | Path) -> Embedding | None:
    """Read one file. None for a file that is not meant as an embedding (a preview image, another suffix);
    EmbeddingError (the reason) for one that should be and is not."""
    path = Path(path)
    stem, suffix = path.stem, path.suffix.lower()
    metadata: dict = {}
    if suffix in IMAGE_SUFFIXES:
        if Path(stem).suffix.lower() == ".preview":
            return None
        data = _read_image(path)
        if data is None:
            return None
        if isinstance(data, dict) and isinstance(data.get("name"), str) and data["name"]:
            stem = data["name"]  # AUTOMATIC1111 names an image embedding by the name stored inside it
    elif suffix in (".pt", ".bin"):
        data = _read_pickle(path)
    elif suffix == ".safetensors":
        data, metadata = _read_safetensors(path)
    else:
        return None
    emb = embedding_from_data(data, stem, metadata)
    emb.filename = str(path)
    emb.hash = file_sha256(path)
    return emb


# -- the model's side -----------------------------------------------------------------------------
def expected_widths(cond_stage) -> dict[str | None, int]:
    """{None: C} for SD 1.x/2.x, {"clip_l": C1, "clip_g": C2} for SDXL: the token-embedding widths."""
    if hasattr(cond_stage, "clip_l"):
        return {"clip_l": _token_embedding(cond_stage.clip_l.text_encoder).weight.shape[1],
                "clip_g": _token_embedding(cond_stage.clip_g.text_encoder).weight.shape[1]}
    return {None: _token_embedding(cond_stage.text_encoder).weight.shape[1]}


def _token_embedding(text_encoder) -> torch.nn.Embedding:
    return text_encoder.get_input_embeddings()


def shape_mismatch(emb: Embedding, cond_stage) -> str | None:
    """Why `emb` does not fit the model's encoder(s), or None when it does."""
    widths = expected_widths(cond_stage)
    if None in widths:
        if isinstance(emb.vec, dict):
            return (f"an SDXL embedding (clip_l {emb.vec['clip_l'].shape[1]} + clip_g {emb.vec['clip_g'].shape[1]}) "
                    f"does not fit this model's text encoder (width {widths[None]})")
        if emb.shape != widths[None]:
            return f"vectors of width {emb.shape} do not fit this model's text encoder (width {widths[None]})"
        return None
    if not isinstance(emb.vec, dict):
        return (f"an SD 1.x/2.x embedding (width {emb.shape}) does not fit this SDXL model (clip_l {widths['clip_l']} "
                f"+ clip_g {widths['clip_g']}); SDXL embeddings carry clip_l and clip_g")
    got = {k: emb.vec[k].shape[1] for k in ("clip_l", "clip_g")}
    if got != widths:
        return f"clip_l {got['clip_l']} + clip_g {got['clip_g']} do not fit this model's " \
               f"clip_l {widths['clip_l']} + clip_g {widths['clip_g']}"
    return None


def _folder_signature(folder: Path) -> tuple:
    if not folder.is_dir():
        return ()
    items = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in files:
            p = Path(root) / f
            try:
                st = p.stat()
            except OSError:
                continue
            items.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sorted(items))


class EmbeddingDatabase:
    """The embeddings of one folder, as they fit one loaded model.

    `loaded` (name -> Embedding, sorted by name) and `skipped` (name -> SkippedEmbedding with the
    reason) are what the last `load` found; `find_embedding_at_position` is what the tokenizer
    asks. A model gets its database from `attach` (sd_models.load_model does it), and
    `load_if_changed` re-reads the folder when a file was added, changed or removed
    (AUTOMATIC1111 checks before every job).
    """

    def __init__(self, embeddings_dir: str | Path | None = None):
        self.embeddings_dir = Path(embeddings_dir) if embeddings_dir is not None else None
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, SkippedEmbedding] = {}
        self.ids_lookup: dict[int, list[tuple[list[int], Embedding]]] = {}
        self._signature: tuple | None = None

    # AUTOMATIC1111's attribute names
    @property
    def word_embeddings(self) -> dict[str, Embedding]:
        return self.loaded

    @property
    def skipped_embeddings(self) -> dict[str, SkippedEmbedding]:
        return self.skipped

    def clear(self) -> None:
        self.loaded, self.skipped, self.ids_lookup = {}, {}, {}

    def register_embedding(self, embedding: Embedding, cond_stage) -> str | None:
        """Add one embedding for token matching; returns a reason if it cannot be (shape, empty name)."""
        reason = shape_mismatch(embedding, cond_stage)
        if reason:
            return reason
        ids = cond_stage.tokenize([embedding.name])[0]
        if not ids:
            return "its name has no tokens, so it can never be written in a prompt"
        old = self.loaded.get(embedding.name)
        if old is not None:
            self._unregister(old, cond_stage)
        self.loaded[embedding.name] = embedding
        lookup = self.ids_lookup.setdefault(ids[0], [])
        lookup.append((ids, embedding))
        lookup.sort(key=lambda x: len(x[0]), reverse=True)
        return None

    def _unregister(self, embedding: Embedding, cond_stage) -> None:
        ids = cond_stage.tokenize([embedding.name])[0]
        if ids and ids[0] in self.ids_lookup:
            self.ids_lookup[ids[0]] = [x for x in self.ids_lookup[ids[0]] if x[1] is not embedding]
            if not self.ids_lookup[ids[0]]:
                del self.ids_lookup[ids[0]]
        self.loaded.pop(embedding.name, None)

    def load(self, embeddings_dir: str | Path | None, model) -> tuple[dict[str, Embedding], dict[str, SkippedEmbedding]]:
        """Read every embedding file under `embeddings_dir` (subfolders too) for `model` (an SDModel or its
        cond_stage). Returns (loaded, skipped); a bad file is skipped with its reason, never raised."""
        if embeddings_dir is not None:
            self.embeddings_dir = Path(embeddings_dir)
        cond_stage = getattr(model, "cond_stage", model)
        self.clear()
        folder = self.embeddings_dir
        self._signature = _folder_signature(folder) if folder is not None else ()
        if folder is None or not folder.is_dir():
            return self.loaded, self.skipped
        paths = sorted((Path(p) for p, _, _ in self._signature), key=lambda p: p.relative_to(folder).as_posix().lower())
        for path in paths:
            if path.suffix.lower() not in EMBEDDING_SUFFIXES or path.name.startswith("."):
                continue
            try:
                if path.stat().st_size == 0:
                    continue  # AUTOMATIC1111 passes over empty files silently
                emb = load_embedding_file(path)
            except EmbeddingError as e:
                self._skip(path.stem, path, str(e))
                continue
            except Exception as e:  # anything else a damaged file can raise
                self._skip(path.stem, path, f"could not be read: {type(e).__name__}: {e}")
                continue
            if emb is None:
                continue
            if emb.name in self.loaded:
                self._skip(emb.name, path, f"another embedding named {emb.name!r} is already loaded from "
                                           f"{self.loaded[emb.name].filename}")
                continue
            reason = self.register_embedding(emb, cond_stage)
            if reason:
                self._skip(emb.name, path, reason, emb)
        self.loaded = dict(sorted(self.loaded.items(), key=lambda kv: kv[0].lower()))
        return self.loaded, self.skipped

    def _skip(self, name: str, path: Path, reason: str, emb: Embedding | None = None) -> None:
        key = name if name not in self.skipped and name not in self.loaded else f"{name} ({path})"
        self.skipped[key] = SkippedEmbedding(name, str(path), reason, emb)

    def load_if_changed(self, model) -> bool:
        """Re-read the folder when its files changed since the last load; True if it re-read."""
        if self.embeddings_dir is None:
            return False
        if self._signature is not None and _folder_signature(self.embeddings_dir) == self._signature:
            return False
        self.load(None, model)
        return True

    def find_embedding_at_position(self, tokens: list[int], offset: int) -> tuple[Embedding | None, int | None]:
        """The longest embedding whose name's token ids start at `tokens[offset]`, and that many tokens."""
        possible = self.ids_lookup.get(tokens[offset])
        if possible is None:
            return None, None
        for ids, embedding in possible:
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None

    def api_dict(self, include_reasons: bool = False) -> dict:
        """AUTOMATIC1111's GET /sdapi/v1/embeddings: {"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name,
        shape, vectors}}, "skipped": {...}}. `include_reasons` adds "reason" (and "path") to each skipped entry."""
        skipped = {}
        for key, s in self.skipped.items():
            entry = s.api_dict()
            if include_reasons:
                entry.update(reason=s.reason, path=s.path)
            skipped[key] = entry
        return {"loaded": {name: e.api_dict() for name, e in self.loaded.items()}, "skipped": skipped}


def attach(model, embeddings_dir: str | Path | None) -> EmbeddingDatabase:
    """Give `model` (an SDModel) the embeddings of `embeddings_dir`, loaded for its encoders; returns the database."""
    db = EmbeddingDatabase(embeddings_dir)
    model.embedding_db = db
    model.cond_stage.embedding_db = db
    db.load(None, model)
    return db


def get_embeddings(model) -> dict:
    """AUTOMATIC1111's GET /sdapi/v1/embeddings for `model` (empty lists when it has no embeddings folder)."""
    db = getattr(model, "embedding_db", None)
    return db.api_dict() if db is not None else {"loaded": {}, "skipped": {}}


def refresh_embeddings(model) -> dict:
    """POST /sdapi/v1/refresh-embeddings: re-read the folder now; returns the new GET /embeddings dict."""
    db = getattr(model, "embedding_db", None)
    if db is None:
        return {"loaded": {}, "skipped": {}}
    db.load(None, model)
    return db.api_dict()


def skipped_in_texts(model, texts) -> list[str]:
    """`Embedding NAME was skipped (reason): its name is encoded as ordinary words` for each skipped embedding
    whose name appears as a word in `texts` (case-insensitive, as the tokenizer is), after re-reading a
    changed folder; a loaded embedding of the same name wins and gives no warning."""
    db = getattr(model, "embedding_db", None)
    if db is None:
        return []
    db.load_if_changed(model)
    if not db.skipped:
        return []
    text = "\n".join(t for t in texts if isinstance(t, str))
    out, seen = [], set()
    for s in db.skipped.values():
        if s.name in db.loaded or s.name in seen or not s.name:
            continue
        if re.search(rf"(?<![\w-]){re.escape(s.name)}(?![\w-])", text, flags=re.IGNORECASE):
            seen.add(s.name)
            out.append(f"Embedding {s.name} was skipped ({s.reason}): its name is encoded as ordinary words")
    return out


def used_embeddings(model, texts) -> dict[str, Embedding]:
    """The embeddings that the texts (as they are encoded) use, by name, in order of first use."""
    db = getattr(model, "embedding_db", None)
    used: dict[str, Embedding] = {}
    if db is None or not db.loaded:
        return used
    for text in texts:
        chunks, _ = model.cond_stage.tokenize_line(text)
        for chunk in chunks:
            for fix in chunk.fixes:
                used.setdefault(fix.embedding.name, fix.embedding)
    return used


def ti_hashes_infotext(model, texts) -> dict[str, str]:
    """{"TI hashes": "name: hash, name2: hash2"} for the embeddings the texts use (AUTOMATIC1111's format:
    `:` and `,` removed from names, 12-digit short hashes); {} when none is used."""
    hashes = []
    for name, emb in used_embeddings(model, texts).items():
        if emb.shorthash:
            hashes.append(f"{name.replace(':', '').replace(',', '')}: {emb.shorthash}")
    return {"TI hashes": ", ".join(hashes)} if hashes else {}


# -- making and saving embeddings ------------------------------------------------------------------
def init_vectors(cond_stage, init_text: str, num_vectors: int, key: str | None = None) -> torch.Tensor:
    """AUTOMATIC1111's create_embedding: vector i is the token embedding of init_text's token
    i * n_tokens // num_vectors (zeros when init_text is empty)."""
    conditioner = getattr(cond_stage, key, cond_stage) if key else cond_stage
    weight = _token_embedding(conditioner.text_encoder).weight
    vec = torch.zeros((num_vectors, weight.shape[1]), dtype=torch.float32)
    if init_text:
        ids = conditioner.tokenize([init_text])[0][:num_vectors] or conditioner.tokenize(["*"])[0]
        embedded = weight.detach()[torch.tensor(ids, device=weight.device)].float().cpu()
        for i in range(num_vectors):
            vec[i] = embedded[i * embedded.shape[0] // num_vectors]
    return vec


def sanitize_name(name: str) -> str:
    """AUTOMATIC1111 keeps letters, digits and `._- ` of an embedding's name."""
    return "".join(x for x in name if x.isalnum() or x in "._- ").strip()


def save_embedding(embedding: Embedding, path: str | Path) -> Path:
    """Write AUTOMATIC1111's .safetensors embedding: `emb_params` (or clip_l + clip_g), with the .pt format's
    fields (name, step, sd_checkpoint, sd_checkpoint_name) as metadata. Written to a temporary file and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(embedding.vec, dict):
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in embedding.vec.items()}
    else:
        tensors = {"emb_params": embedding.vec.detach().float().cpu().contiguous()}
    metadata = {"name": embedding.name, "step": str(embedding.step if embedding.step is not None else 0),
                "sd_checkpoint": embedding.sd_checkpoint or "", "sd_checkpoint_name": embedding.sd_checkpoint_name or "",
                "string_to_token": json.dumps({"*": 265}), "format": "pt"}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    embedding.filename, embedding.hash = str(path), file_sha256(path)
    return path


def pt_dict(embedding: Embedding) -> dict:
    """The dict AUTOMATIC1111's Embedding.save writes to a .pt (and hides in its preview PNGs)."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": embedding.vectors_for(None).detach().cpu()},
            "name": embedding.name, "step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name}


def create_embedding(model, name: str, num_vectors_per_token: int = 1, init_text: str = "*",
                     embeddings_dir: str | Path | None = None, overwrite_old: bool = False) -> Path:
    """AUTOMATIC1111's POST /sdapi/v1/create/embedding: a new embedding of `num_vectors_per_token` vectors
    initialised from `init_text`, saved as `<embeddings_dir>/<name>.safetensors` (step 0); the folder is then
    re-read so the name works in the next prompt. Returns the file's path; FileExistsError unless overwrite_old."""
    cond_stage = model.cond_stage
    name = sanitize_name(name)
    if not name:
        raise ValueError("an embedding needs a name of letters, digits or ._-")
    if not 1 <= int(num_vectors_per_token) <= 75 * 4:
        raise ValueError("num_vectors_per_token must be between 1 and 300")
    folder = Path(embeddings_dir) if embeddings_dir is not None else getattr(model.embedding_db, "embeddings_dir", None)
    if folder is None:
        raise ValueError("no embeddings folder")
    path = folder / f"{name}.safetensors"
    if path.exists() and not overwrite_old:
        raise FileExistsError(f"file {path} already exists")
    if hasattr(cond_stage, "clip_l"):
        vec = {k: init_vectors(cond_stage, init_text, num_vectors_per_token, k) for k in ("clip_l", "clip_g")}
    else:
        vec = init_vectors(cond_stage, init_text, num_vectors_per_token)
    save_embedding(Embedding(name, vec, step=0), path)
    if getattr(model, "embedding_db", None) is not None:
        model.embedding_db.load(None, model)
    return path
