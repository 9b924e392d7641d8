"""Entry point: flags -> model -> UI and/or API on one server -> serve.  Run through ./launch.sh.

One FastAPI app, served by uvicorn: the /sdapi/v1 routes (with --api or --nowebui) and
OpenAPI docs at /docs are its own routes; the Gradio page (`create_ui(ctx)`) is mounted at
`/` unless --nowebui. Both share one WebUIContext, hence one job queue.
"""
from __future__ import annotations

import os
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from modules import cmd_args, sd_models  # noqa: E402
from modules.errors import UserError  # noqa: E402
from webui.context import WebUIContext  # noqa: E402


def create_app(ctx: WebUIContext, args):
    """The server's ASGI app for these flags (also used by tests that want no subprocess)."""
    from fastapi import FastAPI

    app = FastAPI(title="sd-negative-webui", description="AUTOMATIC1111-compatible API (/sdapi/v1)",
                  docs_url="/docs", redoc_url="/redoc")
    if args.api or args.nowebui:
        from webui.api import Api

        Api(app, ctx, auth=cmd_args.parse_auth(args.api_auth) or None, log=args.api_log)
    if not args.nowebui:
        import gradio as gr

        from webui.ui import create_ui

        demo = create_ui(ctx)
        demo.queue()
        auth = cmd_args.parse_auth(args.gradio_auth, args.gradio_auth_path) or None
        app = gr.mount_gradio_app(app, demo, path="/", auth=auth, show_error=True, ssr_mode=False,
                                  server_name=host_of(args), server_port=args.port)
    return app


def host_of(args) -> str:
    return "0.0.0.0" if args.listen else "127.0.0.1"


def try_share_link(server, args) -> None:
    """--share: ask Gradio's tunnel service for a public link once the server is up.

    Without network (always, in this project's tests and CI) the request fails; the server
    goes on serving locally and says so.
    """
    import secrets
    import time

    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.1)
    try:
        from gradio import networking

        url = networking.setup_tunnel("127.0.0.1", args.port, secrets.token_urlsafe(32), None, None)
        print(f"Running on public URL: {url}", flush=True)
    except Exception as e:  # noqa: BLE001 - any failure means the same: no link
        reason = f"{e}" + (f" ({e.__cause__})" if e.__cause__ else "")
        print(f"Could not create share link: {reason}. Serving locally only at "
              f"http://{host_of(args)}:{args.port}", flush=True)


def private_gradio_dir() -> str:
    """Gradio's upload and cache folder for this server alone: mode 0700 under the project's cache/,
    removed at exit. (Gradio's default, /tmp/gradio, is shared by every process on the machine, and
    it serves any file in it.)"""
    import atexit
    import shutil
    import tempfile

    root = cmd_args.REPO / "cache"
    root.mkdir(exist_ok=True)
    folder = tempfile.mkdtemp(prefix="gradio-", dir=root)  # created 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def main(argv: list[str] | None = None) -> None:
    args = cmd_args.parse_args(argv)
    if not args.nowebui:
        os.environ["GRADIO_TEMP_DIR"] = private_gradio_dir()  # before gradio is imported
    if args.nowebui:
        args.api = True
    for flag in ("api_auth", "gradio_auth"):
        cmd_args.parse_auth(getattr(args, flag))  # a malformed entry stops here, before the model loads
    path = args.ckpt or cmd_args.DEFAULT_MODEL
    ray_mode = bool(args.workers or args.ray_address or args.min_workers or args.max_workers)
    if ray_mode:  # Ray first, so an unreachable --ray-address fails before anything loads
        from webui import queue_ray

        try:
            queue_ray.connect(args.ray_address, num_cpus=max(os.cpu_count() or 1, args.workers or 0, args.max_workers or 0))
        except queue_ray.StartError as e:
            sys.exit(f"Cannot start: {e}")
    load_kwargs = sd_models.load_kwargs_from_args(args)
    if ray_mode:
        load_kwargs["device"] = "cpu"  # this process only checks jobs and draws previews: the GPUs are the workers'
    try:
        model = sd_models.load_model(path, **load_kwargs)
    except UserError as e:
        sys.exit(f"Cannot start: {e}")
    print(f"Model {model.name} on {model.device}: {model.describe_precision()}", flush=True)
    ctx = WebUIContext(args, model)
    if ray_mode:
        try:
            ctx.backend = queue_ray.start(ctx, args)
        except queue_ray.StartError as e:
            sys.exit(f"Cannot start: {e}")
    # the model's UNet speed, for job estimates and --max-job-seconds: measured once, before serving when a
    # limit is set (so no request waits for it), else beside the start-up
    if args.max_job_seconds:
        ctx.unet_speed()
    else:
        threading.Thread(target=ctx.unet_speed, name="measure-unet", daemon=True).start()
    app = create_app(ctx, args)

    import uvicorn

    if args.share and args.nowebui:
        print("--share has no effect with --nowebui (there is no UI to share)", flush=True)
    elif args.share:
        if not (args.gradio_auth or args.gradio_auth_path):
            print("Warning: --share without --gradio-auth: anyone with the link can use this UI", flush=True)
        if args.api and not args.api_auth:
            print("Warning: --share with --api and without --api-auth: the API is open to anyone who can "
                  "reach it", flush=True)
    if args.listen and args.api and not args.api_auth:
        print("Warning: --listen with --api and without --api-auth: the API is open to the network", flush=True)

    config = uvicorn.Config(app, host=host_of(args), port=args.port, log_level="warning", timeout_keep_alive=30)
    server = uvicorn.Server(config)
    what = "API" if args.nowebui else ("UI and API" if args.api else "UI")
    print(f"Serving the {what} of model {model.name}; running on local URL: http://{host_of(args)}:{args.port}"
          + ("  (API docs: /docs)" if args.api else ""), flush=True)
    if args.share and not args.nowebui:
        threading.Thread(target=try_share_link, args=(server, args), daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
