"""The Ray Serve queue back-end: the same jobs, spread over N engine replicas on one machine or a cluster.

Chosen by `--workers N` / `--ray-address ADDRESS` (app.py -> `connect`, `start`); `WebUIContext.run`
then hands each job to `RayBackend.run`. Without those flags nothing imports this module, nor Ray.
Everything that moves a job is Ray's own (Ray Serve, and one plain Ray actor for interrupt and skip):

- Workers are the replicas of one deployment, `SDWorker`: each loads the default checkpoint
  once, asks for one GPU where the cluster has GPUs, and takes one job at a time
  (`max_ongoing_requests=1`); jobs that find every replica busy wait in Serve's router, in order.
- A job travels as itself (Ray's cloudpickle: its processing dataclass, init images, the X/Y/Z
  plot's closure), its random seeds drawn before the first try, so every try makes the same images.
- `SDWorker.run` is a streaming method (`handle.options(stream=True)`): it yields ("started",
  replica), one ("step", StepInfo on the CPU, JobState fields) per sampling step, then ("done",
  Processed). The owner's thread feeds each step to the job's own hooks and JobState, so previews,
  progress, the inspector and Compare see the same calls as in-process, and only the owner sees them.
- Checkpoints: the job's checkpoint path is the multiplexed model id; Serve routes it to a replica
  that has it loaded; `serve.multiplexed(max_num_models_per_replica=--models-per-worker)` loads it
  on a miss and drops the least recently used.
- Interrupt and skip of a running job reach its replica only, through one small Ray actor of the
  back-end's (`JobSignals`): the owner posts the action under the job's token, the replica running
  that job long-polls for it and sets its JobState, so the job stops as in-process: an interrupted
  job returns the image of the step where it stopped, a skip ends the current batch of `n_iter` only.
  An interrupted job that still waits is cancelled (Serve's request cancellation): it never reaches a
  replica. (A cancelled stream carries nothing back, hence not used for running jobs.) If the owner
  goes away, Serve cancels the stream and the replica interrupts the job and waits for it, so a
  replica never runs two jobs.
- A replica that dies (killed, out of memory) breaks its stream with an actor error: the job is
  sent again, lands on another replica (Serve starts a new one in its place), the steps the owner
  already saw are not shown twice, and the progress line says "retrying on another worker";
  after `--worker-retries` it fails (503). Results only ever travel on the owner's own stream.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

# A job waiting for a busy replica is routed again after Serve's backoff, which grows to 0.5 s by
# default: an idle gap of up to half a second after each job when every replica is busy. Read at import.
os.environ.setdefault("RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S", "0.05")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.exceptions import (ActorDiedError, ActorUnavailableError, RayActorError,  # noqa: E402
                            TaskCancelledError, WorkerCrashedError)
from ray.serve.exceptions import RequestCancelledError  # noqa: E402

from modules.errors import InterruptedException, InvalidParameter, UserError  # noqa: E402

log = logging.getLogger("webui")

REPO = Path(__file__).resolve().parent.parent
APP_NAME = "sdneg"
RETRY_NOTE = "retrying on another worker"
STATE_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo", "job_timestamp")
WORKER_DEATH = (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError)
CANCELLED = (RequestCancelledError, TaskCancelledError, asyncio.CancelledError)
SIGNALS_NAMESPACE = "serve"  # the replicas' namespace: they find the back-end's JobSignals actor by name


class WorkerLost(UserError):
    """A job whose replica died on every try, or that no replica came up for (503: send it again)."""

    status_code = 503


class StartError(Exception):
    """Ray or the workers could not be started (app.py prints it and exits non-zero)."""


def _fields(state) -> dict:
    return {k: getattr(state, k) for k in STATE_FIELDS}


def _on_cpu(info):
    """The StepInfo with its tensors copied to the CPU (the sampler goes on with the originals)."""
    cpu = lambda t: t.detach().to("cpu", copy=True) if hasattr(t, "detach") else t  # noqa: E731
    return dataclasses.replace(info, x=cpu(info.x), pred_x0=cpu(info.pred_x0),
                               branches={k: cpu(v) for k, v in (info.branches or {}).items() if v is not None},
                               stats={k: cpu(v) for k, v in (info.stats or {}).items()})


@serve.deployment(name="SDWorker", max_ongoing_requests=1, graceful_shutdown_timeout_s=5, health_check_period_s=2)
class SDWorker:
    """One engine replica: checkpoints multiplexed, one job at a time, its steps streamed to the owner."""

    async def __init__(self, config: dict):
        import torch

        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        self.config = config
        self.id = serve.get_replica_context().replica_id.unique_id
        self.loaded: list[str] = []  # model ids, least recently used first
        self.vae_keys: dict[str, Any] = {}
        self.device = f"cuda ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "cpu"

        async def load(model_id: str):
            from modules import sd_models

            model = await asyncio.to_thread(sd_models.load_model, model_id, **config["load_kwargs"])
            return _Loaded(model, model_id, self.loaded)

        try:  # interrupt and skip of running jobs (JobSignals): the owner posts, the replica listens
            self.signals = ray.get_actor(config["signals"], namespace=SIGNALS_NAMESPACE) if config.get("signals") else None
        except ValueError:
            self.signals = None
        self.get_model = serve.multiplexed(max_num_models_per_replica=int(config["models_per_worker"]))(load)
        if config.get("default_model_id"):
            await self.get_model(config["default_model_id"])  # loaded once, before the first job

    def info(self) -> dict:
        return {"id": self.id, "pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": self.device,
                "checkpoints": [Path(m).name for m in self.loaded], "model_ids": list(self.loaded)}

    async def run(self, job, vae: dict, token: str | None = None):
        """Stream one job: ("started", info), ("step", StepInfo, state) per step, ("done", Processed, state, info).

        Interrupt and skip of the job named `token` come from the backend's JobSignals actor while it runs."""
        from modules import processing, sd_vae
        from modules.job_state import JobState

        try:
            model_id = serve.get_multiplexed_model_id()
            loaded = await self.get_model(model_id)
            if self.vae_keys.get(model_id) != vae:  # the sd_vae option as the owner has it now
                await asyncio.to_thread(sd_vae.apply_vae_setting, loaded.model, vae["setting"], vae["vaes"],
                                        vae_path=vae["vae_path"], overrides_per_model=vae["overrides_per_model"],
                                        allow_pickle=vae["allow_pickle"])
                self.vae_keys[model_id] = vae
        except UserError as e:  # a checkpoint or VAE that does not load: the owner's 4xx, unchanged
            yield ("error", e)
            return
        yield ("started", self.info())
        state, loop, queue = JobState(), asyncio.get_running_loop(), asyncio.Queue()
        listener = self._listen(token, state)

        def hook(info) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("step", _on_cpu(info), _fields(state)))

        def go():
            run = job.script.run if job.script is not None else processing.process_images
            return run(loaded.model, job.p, hooks=[hook], state=state)

        work = loop.run_in_executor(None, go)
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (message := await queue.get()) is not None:
                yield message
            try:
                processed = work.result()
            except UserError as e:
                yield ("error", e)
                return
            yield ("done", processed, _fields(state), self.info())
        except asyncio.CancelledError:  # the owner went away (or cancelled as the job started): stop it, free the replica
            state.interrupt()
            await asyncio.wait([work])
            raise
        finally:
            if listener is not None:
                listener.cancel()
                self.signals.forget.remote(token)

    def _listen(self, token: str | None, state) -> asyncio.Task | None:
        """A task applying each signal posted for the job to its JobState (None without signals). Not awaited:
        a job starts at once; one pressed while it waited arrives with the first answer, within its first step."""
        if not token or self.signals is None:
            return None

        async def listen() -> None:
            try:
                while (actions := await self.signals.wait.remote(token)) is not None:
                    for action in actions:
                        if action == "interrupt":
                            state.interrupt()
                        else:
                            state.skip()
            except RayActorError as e:  # the owner is gone: nobody can interrupt the job any more
                log.debug("signals: %s", e)

        return asyncio.ensure_future(listen())


@ray.remote(num_cpus=0)
class JobSignals:
    """Interrupt and skip of jobs on replicas: the owner posts an action for a job's token, the replica running
    that job long-polls for it (one Ray actor per back-end, a few calls per job, nothing per step).

    Serve's request cancellation is used for a job that still waits (it never reaches a replica), not for a
    running one: a cancelled stream carries nothing back, so the interrupted job's image (in-process: the
    last step's prediction) would be lost, and skip would end the whole job instead of the current batch."""

    def __init__(self):
        self.pending: dict[str, list[str]] = {}  # actions posted, not yet taken by the job's replica
        self.events: dict[str, asyncio.Event] = {}

    def _event(self, token: str) -> asyncio.Event:
        return self.events.setdefault(token, asyncio.Event())

    def post(self, token: str, action: str) -> None:
        self.pending.setdefault(token, []).append(action)
        self._event(token).set()

    async def wait(self, token: str) -> list[str] | None:
        """The actions posted for `token` and not yet taken (waits for one); None once the job is forgotten."""
        event = self._event(token)
        await event.wait()
        event.clear()
        return self.pending.pop(token, None) if token in self.events else None

    def forget(self, token: str) -> None:
        """The job ended: its waiting replica gets None, and nothing of it stays here."""
        self.pending.pop(token, None)
        event = self.events.pop(token, None)
        if event is not None:
            event.set()

    def size(self) -> int:
        """How many jobs it holds anything for (0 once every job has ended: nothing stays behind)."""
        return len(self.pending) + len(self.events)


class _Loaded:
    """A checkpoint in a replica's multiplexing cache; Serve calls `__del__` when it evicts it."""

    def __init__(self, model, model_id: str, loaded: list[str]):
        self.model, self.model_id, self.loaded = model, model_id, loaded
        loaded.append(model_id)

    def __del__(self):
        from modules import sd_models

        if self.model_id in self.loaded:
            self.loaded.remove(self.model_id)
        sd_models.unload_model(self.model)


@dataclasses.dataclass
class _Flight:
    """One job between `RayBackend.run` and its replica (the watcher thread reads it)."""

    state: Any
    response: Any = None
    worker: dict | None = None  # the replica that took the current try
    submitted: float = 0.0
    cancelled: str | None = None  # why the owner cancelled the current try
    token: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # the job's name in JobSignals
    interrupt_posted: bool = False
    posted: bool = False  # anything posted for it (then forgotten when it ends)


class RayBackend:
    """The queue back-end `WebUIContext.run` delegates to: each job runs on a Ray Serve replica."""

    def __init__(self, ctx, *, workers: int | None = 2, min_workers: int | None = None,
                 max_workers: int | None = None, models_per_worker: int = 2, max_retries: int = 2,
                 num_gpus: float | None = None, torch_threads: int | None = None,
                 wait_for_workers_s: float = 120.0, app_name: str = APP_NAME):
        """Deploy the workers on the Ray instance this process is connected to (`connect` first)."""
        from modules import sd_models

        self.ctx, self.app_name, self.max_retries = ctx, app_name, int(max_retries)
        self.wait_for_workers_s = wait_for_workers_s
        self._flights: dict[int, _Flight] = {}
        self.replicas: dict[str, dict] = {}  # what each replica's streams said of it, by replica id
        self._lock = threading.Lock()
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        load_kwargs = sd_models.load_kwargs_from_args(ctx.args)
        if not num_gpus:
            load_kwargs["device"] = "cpu"
        default = ctx.model
        config = {"load_kwargs": load_kwargs, "models_per_worker": int(models_per_worker),
                  "default_model_id": str(Path(default.path).resolve()) if default is not None else None,
                  "torch_threads": torch_threads}
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 1, "num_gpus": num_gpus}}
        if min_workers or max_workers:
            lo = int(min_workers or 1)
            hi = max(lo, int(max_workers or workers or lo))
            options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 1}
        else:
            options["num_replicas"] = int(workers or 1)
        serve.start(proxy_location="Disabled")
        config["signals"] = f"{app_name}-signals-{uuid.uuid4().hex[:8]}"
        self.signals = JobSignals.options(name=config["signals"], namespace=SIGNALS_NAMESPACE).remote()
        try:
            self.handle = serve.run(SDWorker.options(**options).bind(config), name=app_name, route_prefix=None)
        except Exception as e:  # noqa: BLE001 - Serve says why; app.py exits with it
            raise StartError(f"the workers did not start: {e}") from e
        self._closed = False
        threading.Thread(target=self._watch, name="ray-jobs-watch", daemon=True).start()

    # -- jobs ----------------------------------------------------------------------------------
    def model_id(self, job) -> str:
        """The multiplexed model id of the job's checkpoint: the option's default at submission, never later."""
        path = job.checkpoint.path if job.checkpoint is not None else getattr(self.ctx.model, "path", None)
        if path is None:
            raise InvalidParameter("No model is loaded: POST /sdapi/v1/reload-checkpoint or pick a checkpoint",
                                   field="sd_model_checkpoint")
        return str(Path(path).resolve())

    def vae_settings(self) -> dict:
        args, opts = self.ctx.args, self.ctx.options
        return {"setting": opts.get("sd_vae"), "vaes": [dataclasses.replace(v, hash_cache=None) for v in self.ctx.vaes or []],
                "vae_path": getattr(args, "vae_path", None),
                "overrides_per_model": opts.get("sd_vae_overrides_per_model_preferences", True),
                "allow_pickle": bool(getattr(args, "allow_pickle_checkpoints", False))}

    def run(self, job, state, hooks=()):
        """Run the job on a replica (waiting for one; `state` may be interrupted meanwhile), its steps going to
        `hooks` and `state` here as they happen; returns its Processed."""
        from modules import processing
        from modules.sd_samplers_common import call_hooks

        model_id, vae = self.model_id(job), self.vae_settings()
        p = copy.copy(job.p)  # random seeds drawn once: every try makes the same images
        p.seed, p.subseed = processing.fix_seed(p.seed), processing.fix_seed(p.subseed)
        travelling = dataclasses.replace(job, p=p, checkpoint=None)  # the model id names the checkpoint
        flight = _Flight(state)
        with self._lock:
            self._flights[id(flight)] = flight
        delivered, failures, note = 0, 0, None
        try:
            while True:
                if state.interrupted:
                    return self.stopped(travelling, state)
                flight.worker, flight.cancelled, flight.submitted = None, None, time.time()
                flight.response = self.handle.options(stream=True, multiplexed_model_id=model_id).run.remote(
                    travelling, vae, flight.token)
                seen = 0
                try:
                    for message in flight.response:
                        if message[0] == "started":
                            flight.worker = self._seen(message[1])
                            if not state.job:
                                state.begin(p.job_name, p.n_iter)
                            self.ctx.current_state = state  # the progress API follows the job that started last
                        elif message[0] == "step":
                            seen += 1
                            if seen > delivered:  # a retry's steps the owner saw already are not shown again
                                delivered = seen
                                self._mirror(state, message[2], note)
                                state.current_step_info = message[1]
                                try:
                                    call_hooks(hooks, message[1])
                                except InterruptedException:  # a hook stops the job, as in-process
                                    state.interrupt()
                        elif message[0] == "error":
                            raise message[1]
                        else:  # done
                            self._mirror(state, message[2], note)
                            self._seen(message[3])
                            if job.keep_checkpoint and job.checkpoint is not None and not self.ctx.is_current(
                                    job.checkpoint):
                                self.ctx.load_model(job.checkpoint.path)  # the default for new jobs, as in-process
                            message[1].worker = message[3]["id"]
                            return message[1]
                    raise RuntimeError("the worker's stream ended without a result")
                except CANCELLED:
                    if flight.cancelled and flight.cancelled.startswith("no worker"):
                        raise WorkerLost(flight.cancelled) from None
                    return self.stopped(travelling, state)
                except WORKER_DEATH as e:
                    if isinstance(e, ActorUnavailableError):  # it may still be running: never twice at once
                        flight.response.cancel()
                    who = (flight.worker or {}).get("id")
                    if who is None:  # routed to a replica that had just died, before it took the job: no try
                        time.sleep(0.2)
                        continue
                    failures += 1
                    if failures > self.max_retries:
                        raise WorkerLost(f"The job was lost: its worker died on each of {failures} tries (last: "
                                         f"{who}, {type(e).__name__}). The server goes on serving: send it again.") \
                            from None
                    note = f"worker {who} lost; {RETRY_NOTE} (try {failures + 1} of {self.max_retries + 1})"
                    state.textinfo = note
                    log.warning("job on worker %s: %s; %s", who, type(e).__name__, RETRY_NOTE)
        finally:
            with self._lock:
                self._flights.pop(id(flight), None)
            if flight.posted:
                self.signals.forget.remote(flight.token)
            if self.ctx.current_state is state:
                self.ctx.current_state = None
            state.end()

    def stopped(self, job, state):
        """What a job interrupted before a replica took it returns: its parameters, no images (the owner's
        model, nothing sampled), as in-process."""
        from modules import processing

        state.interrupt()
        if self.ctx.model is None:
            raise InvalidParameter("Interrupted, and no model is loaded to describe the job", field="sd_model_checkpoint")
        run = job.script.run if job.script is not None else processing.process_images
        return run(self.ctx.model, job.p, hooks=[], state=state)

    @staticmethod
    def _mirror(state, fields: dict, note: str | None) -> None:
        """The replica's JobState fields onto the owner's (the progress API and the page read these)."""
        with state._lock:
            for name, value in fields.items():
                if name == "textinfo" and note:
                    value = f"{note} · {value}" if value else note
                if name != "job" or value:
                    setattr(state, name, value)

    def _seen(self, info: dict) -> dict:
        with self._lock:
            self.replicas[info["id"]] = {**info, "state": "live", "seen": time.time()}
        return info

    def _watch(self) -> None:
        """Interrupt and skip reach the job's replica (JobSignals); an interrupted job that still waits is cancelled
        (it never reaches a replica); a job no replica comes up for fails."""
        while not self._closed:
            time.sleep(0.02)
            with self._lock:
                flights = list(self._flights.values())
            for f in flights:
                if f.response is None or f.cancelled:
                    continue
                if f.state.skipped:  # each press ends one batch on the replica (it clears its own flag there)
                    f.state.skipped = False
                    self._post(f, "skip")
                if f.state.interrupted and f.worker is None:
                    f.cancelled = "interrupt"
                elif f.state.interrupted and not f.interrupt_posted:
                    f.interrupt_posted = True
                    self._post(f, "interrupt")
                elif f.worker is None and time.time() - f.submitted > self.wait_for_workers_s:
                    status = self.status()
                    if status["running"] == 0:
                        f.cancelled = (f"no worker is running to take the job after {self.wait_for_workers_s:.0f} s "
                                       f"(Ray Serve: {status['status']} {status['message']})".strip())
                if f.cancelled:
                    try:
                        f.response.cancel()
                    except Exception as e:  # noqa: BLE001 - best effort; the stream ends either way
                        log.debug("cancel: %s", e)

    def _post(self, flight: _Flight, action: str) -> None:
        flight.posted = True
        self.signals.post.remote(flight.token, action)

    # -- operations ----------------------------------------------------------------------------
    def status(self) -> dict:
        """The workers' deployment as Serve sees it: {status, running, replica_states, message}."""
        try:
            app = serve.status().applications.get(self.app_name)
            dep = app.deployments.get("SDWorker") if app is not None else None
            states = {str(getattr(k, "value", k)): v for k, v in dict(dep.replica_states).items()} if dep else {}
            return {"status": str(getattr(dep.status, "value", dep.status)) if dep else "NOT_DEPLOYED",
                    "running": states.get("RUNNING", 0), "replica_states": states,
                    "message": dep.message if dep else ""}
        except Exception as e:  # noqa: BLE001 - the controller is not answering: say so
            return {"status": "UNKNOWN", "running": 0, "replica_states": {}, "message": f"{type(e).__name__}: {e}"}

    def workers(self) -> list[dict]:
        """Each replica: {id, state: idle | running | dead, job, checkpoints, device, node, pid}.

        Live replicas are Serve's (its named replica actors); what each holds is what it told its
        last job's stream (a new replica holds the default checkpoint)."""
        try:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if a["name"].startswith(f"SERVE_REPLICA::{self.app_name}#SDWorker#")]
        except Exception:  # noqa: BLE001
            names = []
        live = {n.rsplit("#", 1)[-1] for n in names}
        with self._lock:
            running = {f.worker["id"]: f.state for f in self._flights.values() if f.worker and not f.cancelled}
            for rid in [r for r, i in self.replicas.items() if r not in live and time.time() - i["seen"] > 600]:
                del self.replicas[rid]  # a replica dead for 10 minutes is no longer shown
            known = {rid: dict(info) for rid, info in self.replicas.items()}
        default = Path(self.ctx.model.path).name if self.ctx.model is not None else None
        for rid in live - known.keys():
            known[rid] = {"id": rid, "checkpoints": [default] if default else [], "device": None, "pid": None}
        out = []
        for rid, info in sorted(known.items()):
            info.pop("seen", None)
            state = running.get(rid)
            info["state"] = ("dead" if rid not in live else "running" if state is not None else "idle")
            info["job"] = None if state is None else {"job": state.job, "step": state.sampling_step,
                                                      "steps": state.sampling_steps, "job_no": state.job_no,
                                                      "job_count": state.job_count}
            out.append(info)
        return out

    def shutdown(self) -> None:
        """Delete the workers (their GPUs go back to the cluster) and the signals actor."""
        self._closed = True
        try:
            serve.delete(self.app_name)
            ray.kill(self.signals)
        except Exception as e:  # noqa: BLE001
            log.debug("serve.delete: %s", e)


# -- start-up ---------------------------------------------------------------------------------------

def connect(address: str | None = None, num_cpus: int | None = None, timeout_s: float = 30.0) -> None:
    """Join the Ray cluster at `address` (a clear StartError if it does not answer), or start a local
    instance on loopback (no dashboard). A local instance's workers inherit this process's
    environment and sys.path; on a cluster the replicas import this repository through PYTHONPATH
    (a runtime_env: it costs each replica a fresh worker process, hence not used locally)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not address:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, configure_logging=False)
        return
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "HF_HUB_OFFLINE": "1"}}
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise StartError(f"--ray-address {address!r} is not host:port (or ray://host:port)")
    try:  # ray.init would retry for minutes before it says anything
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise StartError(f"Ray is not reachable at --ray-address {address}: {e}. Start the cluster's head "
                         f"(`ray start --head`) or give its address (host:6379, or ray://host:10001)") from None
    try:
        ray.init(address=address, runtime_env=env, log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001
        raise StartError(f"could not join the Ray cluster at --ray-address {address}: {e}") from None


def start(ctx, args) -> RayBackend:
    """--workers / --ray-address / --min-workers / --max-workers: deploy the workers, return the back-end."""
    return RayBackend(ctx, workers=args.workers, min_workers=args.min_workers, max_workers=args.max_workers,
                      models_per_worker=args.models_per_worker, max_retries=args.worker_retries)
