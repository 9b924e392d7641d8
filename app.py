"""Entry point: flags -> model -> UI (+ API) -> serve.  Run through ./launch.sh."""
from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub

from modules import cmd_args, sd_models  # noqa: E402
from modules.errors import UserError  # noqa: E402
from webui.context import WebUIContext  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    args = cmd_args.parse_args(argv)
    path = args.ckpt or cmd_args.DEFAULT_MODEL
    try:
        model = sd_models.load_model(path, device=args.device)
    except UserError as e:
        sys.exit(f"Cannot start: {e}")
    ctx = WebUIContext(args, model)
    from webui.ui import create_ui

    demo = create_ui(ctx)
    auth = cmd_args.parse_auth(args.gradio_auth, args.gradio_auth_path) or None
    demo.queue().launch(server_name="0.0.0.0" if args.listen else "127.0.0.1", server_port=args.port,
                        share=args.share, auth=auth, show_error=True)


if __name__ == "__main__":
    main()
