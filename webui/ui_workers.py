"""The Workers tab (only with --workers / --ray-address): each Ray Serve replica's state, refreshed every 2 s.

It reads `RayBackend.workers()`, the same list `/sdapi/v1/memory` returns under "workers".
"""
from __future__ import annotations

import html

import gradio as gr

COLUMNS = ("id", "state", "job", "checkpoints", "device", "node", "pid")


def workers_html(backend) -> str:
    """A table row per replica: idle / running (its job's step) / dead, its loaded checkpoints and device."""
    status = backend.status()
    rows = []
    for w in backend.workers():
        job = w.get("job")
        cells = {**w, "job": f"{job['job']} step {job['step']}/{job['steps']}" if job else "",
                 "checkpoints": ", ".join(w.get("checkpoints") or [])}
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cells.get(c) or ''))}</td>" for c in COLUMNS) + "</tr>")
    head = "".join(f"<th>{c}</th>" for c in COLUMNS)
    summary = html.escape(f"Ray Serve: {status['status']}, {status['running']} replica(s) running "
                          f"{status['message']}".strip())
    return f"<p>{summary}</p><table id='sdneg_workers_table'><tr>{head}</tr>{''.join(rows)}</table>"


def build_workers_tab(ctx) -> None:
    view = gr.HTML(lambda: workers_html(ctx.backend), elem_id="sdneg_workers")
    gr.Timer(2.0).tick(lambda: workers_html(ctx.backend), None, view, show_progress="hidden")
