"""Prompt styles: named prompt / negative-prompt snippets from CSV files, as AUTOMATIC1111 keeps them.

A styles file is `name,prompt,negative_prompt` with a header row (the older `name,text` header
is read too; `#` at the start of a name marks a comment line). Applying a style to a prompt:
if the style's text contains `{prompt}`, the prompt is put there; otherwise the style's text is
appended after `, ` (empty parts are left out). Several styles apply in the order given, the
negative parts to the negative prompt the same way. `extract_styles_from_prompt` is the inverse
(AUTOMATIC1111's algorithm): it peels styles off the end (or the `{prompt}` frame) of a prompt and
its negative while both match, so an infotext's expanded prompts give back the style names.

Several files may be given (`--styles-file`, repeatable, with `*`/`?` wildcards, as
AUTOMATIC1111 1.7+); a style remembers its file, and `save_styles` writes each file back with its
own styles (new ones go to the first file). A line that cannot be read is skipped, and the
reason is kept in `warnings` (not printed) for the caller to show.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import shutil
import threading
from pathlib import Path
from typing import NamedTuple


MAX_STYLE_NAME = 100


def check_style_name(name) -> str:
    """A new style's name, stripped; raises ValueError saying why a name cannot be saved (empty, too long,
    a line break or control character, `#` first: the CSV reader would take that line for a comment)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("a style needs a name")
    name = name.strip()
    if len(name) > MAX_STYLE_NAME:
        raise ValueError(f"a style name may have at most {MAX_STYLE_NAME} characters, got {len(name)}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("a style name may not contain line breaks or control characters")
    if name.startswith("#"):
        raise ValueError("a style name may not start with # (styles.csv reads such a line as a comment)")
    if name == "None":
        raise ValueError("'None' is reserved (it means no style)")
    return name


class PromptStyle(NamedTuple):
    name: str
    prompt: str
    negative_prompt: str
    path: str | None = None


def merge_prompts(style_prompt: str, prompt: str) -> str:
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(filter(None, (prompt.strip(), style_prompt.strip())))


def apply_styles_to_prompt(prompt: str, styles: list[str]) -> str:
    """Apply style texts (not names) in order."""
    for style in styles:
        prompt = merge_prompts(style, prompt)
    return prompt


def extract_style_text_from_prompt(style_text: str, prompt: str) -> tuple[bool, str]:
    """(True, prompt without the style's text) if the style could have made `prompt`, else (False, prompt).

    `masterpiece` from `1girl, art by greg, masterpiece` -> `1girl, art by greg`;
    `masterpiece, {prompt}` from `masterpiece, 1girl, art by greg` -> `1girl, art by greg`.
    """
    stripped_prompt = prompt.strip()
    stripped_style_text = style_text.strip()
    if "{prompt}" in stripped_style_text:
        left, _, right = stripped_style_text.partition("{prompt}")
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            return True, stripped_prompt[len(left):len(stripped_prompt) - len(right)]
    elif stripped_prompt.endswith(stripped_style_text):
        prompt = stripped_prompt[:len(stripped_prompt) - len(stripped_style_text)]
        if prompt.endswith(", "):
            prompt = prompt[:-2]
        return True, prompt
    return False, prompt


def extract_original_prompts(style: PromptStyle, prompt: str, negative_prompt: str) -> tuple[bool, str, str]:
    """Both the style's prompt and its negative must match for the style to be taken off."""
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative_prompt
    match_positive, extracted_positive = extract_style_text_from_prompt(style.prompt or "", prompt)
    if not match_positive:
        return False, prompt, negative_prompt
    match_negative, extracted_negative = extract_style_text_from_prompt(style.negative_prompt or "", negative_prompt)
    if not match_negative:
        return False, prompt, negative_prompt
    return True, extracted_positive, extracted_negative


class StyleDatabase:
    """The styles of one or more CSV files (paths or wildcard patterns; the first is where new styles go)."""

    prompt_fields = ["name", "prompt", "negative_prompt"]

    def __init__(self, paths: str | Path | list[str | Path] | None = None):
        if paths is None or paths == []:
            paths = ["styles.csv"]
        if isinstance(paths, (str, Path)):
            paths = [paths]
        self.paths = [str(p) for p in paths]
        self.no_style = PromptStyle("None", "", "", None)
        self.styles: dict[str, PromptStyle] = {}
        self.warnings: list[str] = []
        self.lock = threading.RLock()  # saving from two pages at once writes one file after the other
        first = self.paths[0]
        if any(c in os.path.basename(first) for c in "*?"):
            found = sorted(glob.glob(first))
            self.default_path = Path(found[0]) if found else Path(os.path.dirname(first) or ".") / "styles.csv"
        else:
            self.default_path = Path(first)
        self.reload()

    def files(self) -> list[Path]:
        """The files the patterns name now (a plain path is listed even if it does not exist yet)."""
        out: list[Path] = []
        for pattern in [str(self.default_path)] + self.paths:
            if any(c in os.path.basename(pattern) for c in "*?"):
                out += [Path(p) for p in sorted(glob.glob(pattern))]
            else:
                out.append(Path(pattern))
        seen: set[str] = set()
        return [p for p in out if not (str(p.resolve()) in seen or seen.add(str(p.resolve())))]

    def reload(self) -> list[str]:
        """Read every file again; returns the warnings (also in `self.warnings`). The new styles replace the
        old ones at once, so a job applying styles meanwhile sees the old set or the new one, never none."""
        styles: dict[str, PromptStyle] = {}
        warnings: list[str] = []
        with self.lock:
            loaded = [p for p in self.files() if p.is_file()]
            for path in loaded:
                self._read_csv(path, styles, warnings)
            self.styles, self.warnings, self.loaded_files = styles, warnings, loaded
        return warnings

    def load_from_csv(self, path: str | Path) -> None:
        self._read_csv(Path(path), self.styles, self.warnings)

    def _read_csv(self, path: Path, styles: dict, warnings: list) -> None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            warnings.append(f"{path}: could not be read: {type(e).__name__}: {e}")
            return
        try:
            reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
            fields = reader.fieldnames or []
        except csv.Error as e:
            warnings.append(f"{path}: not a CSV file: {e}")
            return
        if "name" not in fields or not ({"prompt", "text"} & set(fields)):
            if fields:
                warnings.append(f"{path}: the header must name the columns name,prompt,negative_prompt "
                            f"(found {','.join(fields)})")
            return
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                warnings.append(f"{path} line {reader.line_num}: skipped: {e}")
                continue
            line = reader.line_num
            if not row or not any(v for v in row.values() if isinstance(v, str)):
                continue
            name = row.get("name")
            if None in row:  # more columns than the header
                warnings.append(f"{path} line {line}: skipped: more columns than the header "
                            f"({','.join(fields)}); quote texts that contain commas")
                continue
            if not name or not name.strip():
                warnings.append(f"{path} line {line}: skipped: no name")
                continue
            if name.startswith("#"):
                continue
            prompt = row.get("prompt") if "prompt" in row else row.get("text")
            negative = row.get("negative_prompt")
            styles[name] = PromptStyle(name, prompt or "", negative or "", str(path))

    # -- applying -----------------------------------------------------------------------------------
    def unknown(self, styles: list[str]) -> list[str]:
        return [s for s in styles if s not in self.styles]

    def get_style_prompts(self, styles: list[str]) -> list[str]:
        return [self.styles.get(x, self.no_style).prompt for x in styles]

    def get_negative_style_prompts(self, styles: list[str]) -> list[str]:
        return [self.styles.get(x, self.no_style).negative_prompt for x in styles]

    def apply_styles_to_prompt(self, prompt: str, styles: list[str]) -> str:
        return apply_styles_to_prompt(prompt, self.get_style_prompts(styles))

    def apply_negative_styles_to_prompt(self, prompt: str, styles: list[str]) -> str:
        return apply_styles_to_prompt(prompt, self.get_negative_style_prompts(styles))

    def apply_to_job(self, p) -> list[str]:
        """Expand `p.styles` into `p.prompt` and `p.negative_prompt` (a StableDiffusionProcessing), as
        AUTOMATIC1111's process_images does before encoding; `p.styles` is then emptied so that running `p`
        again does not apply them twice. Returns the job's warnings (unknown style names: left out)."""
        names = list(getattr(p, "styles", None) or [])
        warnings = [f"Style not found: {name}" for name in self.unknown(names)]
        known = [name for name in names if name in self.styles]
        p.prompt = self.apply_styles_to_prompt(p.prompt, known)
        p.negative_prompt = self.apply_negative_styles_to_prompt(p.negative_prompt, known)
        p.styles = []
        return warnings

    def extract_styles_from_prompt(self, prompt: str, negative_prompt: str) -> tuple[list[str], str, str]:
        """(style names, prompt, negative prompt) with the styles taken off, in the order they were applied."""
        extracted = []
        applicable = list(self.styles.values())
        while True:
            found = None
            for style in applicable:
                is_match, new_prompt, new_negative = extract_original_prompts(style, prompt, negative_prompt)
                if is_match:
                    found, prompt, negative_prompt = style, new_prompt, new_negative
                    break
            if not found:
                break
            applicable.remove(found)
            extracted.append(found.name)
        return list(reversed(extracted)), prompt, negative_prompt

    # -- editing and saving ------------------------------------------------------------------------
    def add_style(self, name: str, prompt: str, negative_prompt: str = "", path: str | Path | None = None) -> None:
        old = self.styles.get(name)
        where = str(path) if path is not None else (old.path if old is not None else str(self.default_path))
        self.styles[name] = PromptStyle(name, prompt, negative_prompt, where)

    def save_style(self, name: str, prompt: str, negative_prompt: str = "") -> tuple[str, bool]:
        """Add (or replace) a style and write its file at once, atomically: (name, whether it replaced one).
        Raises ValueError for a name that cannot be saved (check_style_name), OSError if the file cannot be
        written (the styles are then as they were)."""
        name = check_style_name(name)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise ValueError("a style's prompt and negative prompt must be text")
        with self.lock:
            old = self.styles.get(name)
            self.add_style(name, prompt, negative_prompt)
            try:
                self.save_styles()
            except OSError:
                if old is None:
                    self.styles.pop(name, None)
                else:
                    self.styles[name] = old
                raise
        return name, old is not None

    def delete_style(self, name: str) -> bool:
        return self.styles.pop(name, None) is not None

    def save_styles(self, path: str | Path | None = None) -> list[Path]:
        """Write the styles back, atomically (a temporary file renamed over the old one, which is kept as
        `.bak`). With `path`, every style goes to that one file; without, each file gets its own styles
        (AUTOMATIC1111 1.7+). Returns the files written."""
        if path is not None:
            groups = {str(path): list(self.styles.values())}
        else:  # every file read (a file whose last style was deleted is written empty), and the first
            groups = {str(p): [] for p in [self.default_path, *getattr(self, "loaded_files", [])]}
            for style in self.styles.values():
                groups.setdefault(style.path or str(self.default_path), []).append(style)
        written = []
        for target, styles in groups.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            try:
                with open(tmp, "w", encoding="utf-8-sig", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=self.prompt_fields)
                    writer.writeheader()
                    for s in styles:
                        writer.writerow({"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt})
                if target.exists():
                    shutil.copy2(target, target.with_name(target.name + ".bak"))
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)  # nothing half-written is left behind
            written.append(target)
        return written

    def prompt_styles(self) -> list[dict]:
        """AUTOMATIC1111's GET /sdapi/v1/prompt-styles: [{"name", "prompt", "negative_prompt"}]."""
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in self.styles.values()]
