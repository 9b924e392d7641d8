"""Scripts: jobs built out of many txt2img runs (AUTOMATIC1111's "Script" dropdown).

Each script is a module here that is importable without Gradio; the UI and the API only
parse their arguments and hand the job to the engine. Names are AUTOMATIC1111's titles,
compared case-insensitively (`"x/y/z plot"` in its API).
"""
from __future__ import annotations

XYZ_PLOT = "X/Y/Z plot"

# The scripts the txt2img tab and `script_name` accept ("None" means no script).
txt2img_scripts = [XYZ_PLOT]


def find_script(name: str | None) -> str | None:
    """A script title in any case -> its canonical title; None / "" / "None" -> None; unknown -> KeyError."""
    if name is None or str(name).strip() in ("", "None", "none"):
        return None
    for title in txt2img_scripts:
        if title.lower() == str(name).strip().lower():
            return title
    raise KeyError(name)
