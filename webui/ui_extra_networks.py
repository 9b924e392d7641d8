"""The Extra networks panel of a job tab: AUTOMATIC1111's cards for Textual Inversion and Lora, with search.

A click on a card puts its text in a prompt box, as AUTOMATIC1111's `cardClicked` does: an
embedding's name goes to the prompt or, when the negative prompt was the box focused last, to the
negative prompt; a LoRA's `<lora:name:1>` always goes to the prompt (AUTOMATIC1111 reads LoRA
tags from the prompt only, and so does this engine). Clicking a card whose text is already in
that box takes it out again. The text is inserted in the browser (a few lines of JS on the cards'
element, `js_on_load`) and announced with an `input` event, so Gradio's value is the box's text.

The cards are rendered here from what the engine knows: the loaded model's embedding database
(those skipped for this model are listed under the cards with the reason) and the LoRA folder.
A preview is the `<name>.png` / `<name>.preview.png` (or .jpg, .jpeg, .webp) beside the file,
decoded with the same checks as a client's image (modules/images.decode_image), shrunk, and
inlined as a data URI; an unreadable preview is left out, never fatal.
"""
from __future__ import annotations

import base64
import html
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from modules.errors import UserError
from webui.ui_common import log

PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PREVIEW_SIDE = 192  # pixels: a card's thumbnail
MAX_PREVIEW_BYTES = 16 * 2 ** 20
MAX_PREVIEW_SIDE = 4096

CSS = """
.sdneg-cards { display: flex; flex-wrap: wrap; gap: 8px; }
.sdneg-cards .card { position: relative; width: 128px; height: 160px; border-radius: 6px; overflow: hidden;
  cursor: pointer; background: var(--block-background-fill, #eee); border: 1px solid var(--border-color-primary, #ccc);
  display: flex; flex-direction: column; justify-content: flex-end; }
.sdneg-cards .card:hover { outline: 2px solid var(--color-accent, #f97316); }
.sdneg-cards .card img.preview { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: cover; }
.sdneg-cards .card .actions { position: relative; padding: 4px 6px; background: rgba(0, 0, 0, 0.55); color: #fff; }
.sdneg-cards .card .name { display: block; font-weight: 600; word-break: break-all; font-size: 0.9em; }
.sdneg-cards .card .description { display: block; font-size: 0.75em; opacity: 0.85; }
.sdneg-cards .card .search_term { display: none; }
.sdneg-cards-empty { opacity: 0.7; font-size: 0.9em; }
.sdneg-skipped { font-size: 0.85em; margin-top: 6px; }
"""

# Runs once per cards element (js_on_load): the click inserts or removes the card's text, the search box
# filters the cards (again after each re-render), and the prompt box focused last is remembered per tab.
CARDS_JS = r"""
const kind = %(kind)s;
window.sdnegActivePrompt = window.sdnegActivePrompt || {};
window.sdnegFocusWired = window.sdnegFocusWired || {};
if (!window.sdnegFocusWired[kind]) {
  window.sdnegFocusWired[kind] = true;
  document.addEventListener("focusin", (e) => {
    const box = e.target && e.target.closest ? e.target.closest("#" + kind + "_prompt, #" + kind + "_neg_prompt") : null;
    if (box && (e.target.tagName === "TEXTAREA" || e.target.tagName === "INPUT")) window.sdnegActivePrompt[kind] = box.id;
  });
}
const esc = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
const toggle = (value, text) => {
  const lora = text.match(/^<([^:<>]+):([^:<>]+)(:[^<>]*)?>$/);
  const re = lora ? new RegExp("\\s*<" + esc(lora[1]) + ":" + esc(lora[2]) + "(:[^<>]*)?>", "gi")
                  : new RegExp("(^|\\s+|(?<=[,(\\[]))" + esc(text) + "(?![\\w-])", "g");
  const removed = value.replace(re, "");
  if (removed !== value) return removed.replace(/^\s+/, "");
  return value.length && !/\s$/.test(value) ? value + " " + text : value + text;
};
const filter = () => {
  const box = document.querySelector("#" + kind + "_extra_search textarea, #" + kind + "_extra_search input");
  const query = box ? box.value.trim().toLowerCase() : "";
  element.querySelectorAll(".card").forEach((card) => {
    card.style.display = !query || (card.dataset.search || "").includes(query) ? "" : "none";
  });
};
if (!element.dataset.sdnegWired) {
  element.dataset.sdnegWired = "1";
  element.addEventListener("click", (e) => {
    const card = e.target.closest(".card");
    if (!card || !element.contains(card)) return;
    const negative = card.dataset.allowNeg === "1" && window.sdnegActivePrompt[kind] === kind + "_neg_prompt";
    const area = document.querySelector("#" + kind + (negative ? "_neg_prompt" : "_prompt") + " textarea");
    if (!area) return;
    area.value = toggle(area.value, card.dataset.prompt);
    area.dispatchEvent(new Event("input", {bubbles: true}));
  });
  document.addEventListener("input", (e) => {
    if (e.target && e.target.closest && e.target.closest("#" + kind + "_extra_search")) filter();
  });
  watch("value", filter);
}
filter();
"""


@dataclass(frozen=True)
class Card:
    """One card: what a click inserts, what it shows, what the search matches."""

    name: str
    prompt: str  # the text a click inserts
    description: str
    search: str  # lower case: name, file, alias
    allow_negative: bool
    path: str
    preview: str | None = None  # a data URI


def find_preview(path: str | Path) -> Path | None:
    """`<name>.png` or `<name>.preview.png` (.jpg, .jpeg, .webp) beside the file, as AUTOMATIC1111 looks;
    an embedding stored in a PNG/WebP is its own preview."""
    path = Path(path)
    base = path.with_suffix("")
    for candidate in [base.with_name(base.name + s) for s in PREVIEW_SUFFIXES] + \
                     [base.with_name(base.name + ".preview" + s) for s in PREVIEW_SUFFIXES]:
        if candidate.is_file() and candidate != path:
            return candidate
    if path.suffix.lower() in PREVIEW_SUFFIXES and path.is_file():
        return path
    return None


class PreviewCache:
    """Thumbnails as data URIs, made once per file version (path, size, mtime)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._uris: dict[tuple, str | None] = {}

    def uri(self, path: Path | None) -> str | None:
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._uris:
                return self._uris[key]
        uri = thumbnail_uri(path, st.st_size)
        with self._lock:
            self._uris[key] = uri
        return uri


def thumbnail_uri(path: Path, size: int) -> str | None:
    """A small JPEG of the image at `path` as a data URI, or None (too big, not an image, damaged)."""
    from modules import images as images_module

    if size > MAX_PREVIEW_BYTES:
        return None
    try:
        image = images_module.decode_image(path.read_bytes(), field="preview", max_side=MAX_PREVIEW_SIDE)
        image = image.convert("RGB")
        image.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=85)
    except (UserError, OSError, ValueError) as e:
        log.warning("extra networks: preview %s not shown: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def lora_dir(ctx) -> Path:
    """The LoRA folder: the loaded model's (--lora-dir), else --lora-dir / models/Lora (as GET /loras)."""
    state = getattr(getattr(ctx, "model", None), "lora_state", None)
    if state is not None:
        return Path(state.lora_dir)
    return Path(getattr(ctx.args, "lora_dir", None) or ctx.models_dir / "Lora")


def embedding_cards(model, previews: PreviewCache) -> tuple[list[Card], list[tuple[str, str]]]:
    """The cards of the embeddings that fit `model`, and (name, reason) of those skipped."""
    db = getattr(model, "embedding_db", None)
    if db is None:
        return [], []
    db.load_if_changed(model)
    cards = []
    for name, emb in db.loaded.items():
        filename = getattr(emb, "filename", None) or ""
        cards.append(Card(name, name, f"{emb.vectors} vector{'s' if emb.vectors != 1 else ''}"
                          + (f", step {emb.step}" if getattr(emb, "step", None) else ""),
                          f"{name} {Path(filename).name}".lower(), True, filename,
                          previews.uri(find_preview(filename)) if filename else None))
    skipped = [(s.name, s.reason) for s in db.skipped.values()]
    return cards, skipped


def lora_cards(folder: Path, previews: PreviewCache) -> list[Card]:
    from modules import extra_networks_lora

    cards = []
    for name, lora in extra_networks_lora.list_loras(folder).items():
        alias = lora.alias
        description = f"alias {alias}" if alias and alias != name else ""
        cards.append(Card(name, f"<lora:{name}:1>", description, f"{name} {alias} {Path(lora.filename).name}".lower(),
                          False, lora.filename, previews.uri(find_preview(lora.filename))))
    return cards


def cards_html(cards: list[Card], empty: str, skipped: list[tuple[str, str]] = ()) -> str:
    """AUTOMATIC1111's card markup (`.card` > `.actions` > `.name`), with the text to insert in `data-prompt`."""
    if cards:
        items = []
        for c in cards:
            preview = f'<img class="preview" src="{c.preview}" alt="" loading="lazy">' if c.preview else ""
            items.append(
                f'<div class="card" data-name="{html.escape(c.name)}" data-prompt="{html.escape(c.prompt)}" '
                f'data-allow-neg="{1 if c.allow_negative else 0}" data-search="{html.escape(c.search)}" '
                f'title="{html.escape(c.path)}">{preview}<div class="actions">'
                f'<span class="name">{html.escape(c.name)}</span>'
                f'<span class="description">{html.escape(c.description)}</span>'
                f'<span class="search_term">{html.escape(c.search)}</span></div></div>')
        body = '<div class="sdneg-cards">' + "".join(items) + "</div>"
    else:
        body = f'<div class="sdneg-cards-empty">{html.escape(empty)}</div>'
    if skipped:
        body += ('<div class="sdneg-skipped sdneg-warnings"><b>Skipped for this model</b><ul>'
                 + "".join(f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, r in skipped) + "</ul></div>")
    return body


class ExtraNetworksPanel:
    """The panel's content for one server context (both tabs' cards are rendered from it on demand)."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.previews = PreviewCache()

    def textual_inversion_html(self) -> str:
        model = self.ctx.model
        if model is None:
            return cards_html([], "No model is loaded: embeddings are listed for the loaded model")
        cards, skipped = embedding_cards(model, self.previews)
        folder = getattr(getattr(model, "embedding_db", None), "embeddings_dir", None)
        return cards_html(cards, f"No embeddings for this model in {folder or 'the embeddings folder'}", skipped)

    def lora_html(self) -> str:
        folder = lora_dir(self.ctx)
        return cards_html(lora_cards(folder, self.previews), f"No LoRA files in {folder}")

    def refresh(self) -> tuple[str, str]:
        """Re-read the embeddings folder now (and the LoRA folder, which is read at every listing)."""
        from modules import textual_inversion

        if self.ctx.model is not None:
            textual_inversion.refresh_embeddings(self.ctx.model)
        return self.textual_inversion_html(), self.lora_html()


def build_extra_networks(ctx, kind: str, c: dict, panel: ExtraNetworksPanel | None = None) -> ExtraNetworksPanel:
    """The panel under the prompts (closed until opened, as AUTOMATIC1111's): search, refresh, two tabs of cards."""
    panel = panel or ExtraNetworksPanel(ctx)
    js = CARDS_JS % {"kind": json.dumps(kind)}
    with gr.Accordion("Extra networks", open=False, elem_id=f"{kind}_extra_networks") as accordion:
        gr.HTML(f"<style>{CSS}</style>", padding=False, elem_id=f"{kind}_extra_networks_css")
        with gr.Row():
            c["extra_search"] = gr.Textbox(show_label=False, placeholder="Search…", elem_id=f"{kind}_extra_search",
                                           lines=1, max_lines=1, scale=4, container=False)
            c["extra_refresh"] = gr.Button("↻ Refresh", elem_id=f"{kind}_extra_refresh", scale=0, size="sm")
        with gr.Tabs(elem_id=f"{kind}_extra_tabs"):
            with gr.Tab("Textual Inversion", elem_id=f"{kind}_textual_inversion"):
                c["textual_inversion_cards"] = gr.HTML(panel.textual_inversion_html, js_on_load=js,
                                                       elem_id=f"{kind}_textual_inversion_cards")
            with gr.Tab("Lora", elem_id=f"{kind}_lora"):
                c["lora_cards"] = gr.HTML(panel.lora_html, js_on_load=js, elem_id=f"{kind}_lora_cards")
    outputs = [c["textual_inversion_cards"], c["lora_cards"]]
    c["extra_refresh"].click(panel.refresh, None, outputs, queue=False, show_progress="hidden")
    accordion.expand(lambda: (panel.textual_inversion_html(), panel.lora_html()), None, outputs, queue=False,
                     show_progress="hidden")
    return panel
