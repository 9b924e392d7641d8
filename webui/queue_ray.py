"""WORK IN PROGRESS (issue #19): not wired into app.py and not tested yet; nothing imports it.

The Ray Serve queue back-end: the same jobs, spread over N engine replicas on one machine or a cluster.

`WebUIContext.run(job, state, hooks)` hands a job here when the server was started with
`--workers N` or `--ray-address ADDRESS` (app.py -> `start`); without them this module is
never imported, and neither is Ray. Everything that moves a job is Ray Serve's own:

- **Workers** are the replicas of one deployment, `SDWorker`: each loads the default
  checkpoint once (in its `__init__`), asks Ray for one GPU where the cluster has GPUs, and
  runs one job at a time (`max_ongoing_requests=1`). Jobs that find every replica busy wait
  in Serve's router, first come first served (among jobs for the same checkpoint first).
- **A job travels as itself**: the `Job` (its processing dataclass, PIL init images and the
  X/Y/Z plot's closure included) is pickled by Ray's cloudpickle, which pickles a nested
  function by value with its closure cells, so the job layer needs no change. The
  checkpoint travels as the multiplexed model id (its resolved path), not as an object.
- **Steps stream back**: `SDWorker.run` is an async generator. It runs the job on a thread
  and yields one message per sampling step (the StepInfo's tensors copied to the CPU and
  the replica's JobState fields), then the Processed. The owner's side (`RayBackend.run`,
  on the thread that called ctx.run) rebuilds a StepInfo from each message, mirrors the
  JobState (job_no, sampling_step, textinfo, current_step_info) and calls the local hooks:
  previews, progress, the inspector and Compare see the same calls as in-process.
- **Checkpoints** are Serve's model multiplexing: `handle.options(multiplexed_model_id=path)`
  routes a job to a replica that has that checkpoint loaded (`serve.get_multiplexed_model_id`
  on the replica); `--models-per-worker` is `max_num_models_per_replica` (least recently used
  out first).
- **Interrupt and skip** go to the one replica that runs the job. A job still waiting in the
  queue is cancelled (`response.cancel()`): it never reaches a replica. A running job is told
  through `SDBoard`, a one-replica deployment: the replica watches its job's signals (a
  streamed `watch` call while the job runs) and sets that job's JobState, so process_images
  stops at the next step and the partial result streams back as usual (a cancelled stream
  could not carry it). Cancelling a running request stays the hard stop (the owner went
  away, or a signal went unanswered): the replica catches the CancelledError, interrupts the
  job and waits for its thread, so it never runs two jobs at once.
- **Nothing is lost**: random seeds are fixed before the first try; a stream that breaks
  because its replica died (killed, OOM) is sent again and lands on another replica (Serve
  replaces the dead one). The retry's steps that the owner already saw are not shown
  again, so hooks see each step once; the progress line says "retrying on another worker".
  After `--max-retries` the job fails with `WorkerLost` (HTTP 503). A job only runs again
  when its stream broke before the result arrived, and results go back on the owner's
  own stream only.
- **Operations**: replicas report their state (idle / running which job, loaded
  checkpoints, device, pid) to `SDBoard` on every change and every `HEARTBEAT_S`;
  `RayBackend.workers()` lists them (the Workers panel, /sdapi/v1/memory).
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, TaskCancelledError, WorkerCrashedError
from ray.serve.exceptions import RequestCancelledError

from modules.errors import InterruptedException, UserError

log = logging.getLogger("webui")

REPO = Path(__file__).resolve().parent.parent
APP_NAME = "sd-webui"
WORKER = "SDWorker"
BOARD = "SDBoard"
HEARTBEAT_S = 2.0  # how often an idle or busy replica reports to the board
LOST_AFTER_S = 3 * HEARTBEAT_S + 1  # a replica silent this long is shown as lost
FORGET_AFTER_S = 120.0  # ... and this long, no longer shown
WATCH_INTERVAL_S = 0.05  # how often the owner's side looks for interrupted / skipped / stuck jobs
CANCEL_AFTER_S = 10.0  # an interrupt the replica has not acted on by then becomes a cancellation
UNAVAILABLE_AFTER_S = 120.0  # a job waiting this long while no replica is running fails
CONNECT_TIMEOUT_S = 30.0  # --ray-address: how long joining the cluster may take
RETRY_NOTE = "retrying on another worker"


class WorkerLost(UserError):
    """A job whose replica died on every try (HTTP 503: the server is fine, try again)."""

    status_code = 503


class WorkersUnavailable(UserError):
    """No replica came up to run a job that waited for one (HTTP 503)."""

    status_code = 503


class StartError(Exception):
    """Ray or the workers could not be started (app.py prints it and exits non-zero)."""


# -- messages -------------------------------------------------------------------------------------

STATE_FIELDS = ("job", "job_count", "job_no", "sampling_step", "sampling_steps", "textinfo", "job_timestamp")


def _cpu(t):
    """A tensor copied to the CPU: the sampler goes on with the original while the message is sent."""
    return t.detach().to("cpu", copy=True)


def step_message(info, state) -> dict:
    """A StepInfo (tensors on the CPU) and the replica's JobState fields, as one picklable message."""
    return {"kind": "step", "step": info.step, "steps": info.steps, "timestep": float(info.timestep),
            "x": _cpu(info.x), "pred_x0": _cpu(info.pred_x0),
            "branches": {k: _cpu(v) for k, v in (info.branches or {}).items() if v is not None},
            "stats": {k: _cpu(v) if hasattr(v, "detach") else v for k, v in (info.stats or {}).items()},
            "pass_label": info.pass_label, "state": {k: getattr(state, k) for k in STATE_FIELDS}}


def step_info(message: dict):
    """The StepInfo a step message describes (what the owner's hooks receive)."""
    from modules.sd_samplers_common import StepInfo

    return StepInfo(step=message["step"], steps=message["steps"], timestep=message["timestep"], x=message["x"],
                    pred_x0=message["pred_x0"], branches=dict(message["branches"]), stats=dict(message["stats"]),
                    pass_label=message["pass_label"])


def _picklable_error(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - whatever fails to travel travels as its text
        return RuntimeError(f"{type(e).__name__}: {e}")


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()} ({torch.cuda.get_device_name()})"
    return "cpu"


# -- the deployments ----------------------------------------------------------------------------------

@serve.deployment(name=BOARD, num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0},
                  graceful_shutdown_timeout_s=2)
class SDBoard:
    """What replicas and owners tell each other besides the job stream: replica reports, job signals.

    Async and light (it never imports torch). Signals are kept per job until the owner
    forgets the job, so a retry on another replica sees an interrupt sent before it.
    """

    def __init__(self):
        self._reports: dict[str, dict] = {}
        self._signals: dict[str, list[tuple]] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._touched: dict[str, float] = {}

    async def report(self, info: dict) -> None:
        self._reports[info["id"]] = {**info, "seen": time.time()}

    async def reports(self) -> list[dict]:
        now = time.time()
        for rid in [r for r, v in self._reports.items() if now - v["seen"] > FORGET_AFTER_S]:
            del self._reports[rid]
        return [{**v, "seen_s_ago": round(now - v["seen"], 2)} for v in self._reports.values()]

    async def signal(self, job_id: str, kind: str, job_no: int | None = None) -> None:
        self._signals.setdefault(job_id, []).append((kind, job_no))
        self._touched[job_id] = time.time()
        self._changed.setdefault(job_id, asyncio.Event()).set()
        self._drop_stale()

    async def watch(self, job_id: str):
        """Every signal of the job so far, then each new one, until the watcher cancels the call."""
        seen = 0
        event = self._changed.setdefault(job_id, asyncio.Event())
        while True:
            signals = self._signals.get(job_id, [])
            while seen < len(signals):
                yield signals[seen]
                seen += 1
            event.clear()
            if seen < len(self._signals.get(job_id, [])):
                continue
            await event.wait()

    async def forget(self, job_id: str) -> None:
        self._signals.pop(job_id, None)
        self._touched.pop(job_id, None)
        event = self._changed.pop(job_id, None)
        if event is not None:
            event.set()

    def _drop_stale(self) -> None:
        now = time.time()
        for job_id in [j for j, t in self._touched.items() if now - t > 3600]:
            self._signals.pop(job_id, None)
            self._touched.pop(job_id, None)


class _Loaded:
    """A checkpoint in a replica's multiplexing cache; Serve calls `__del__` when it evicts it."""

    def __init__(self, model, model_id: str, on_unload):
        self.model, self.model_id, self._on_unload = model, model_id, on_unload
        self.vae_key: Any = None

    def __del__(self):
        model, self.model = self.model, None
        if model is not None:
            from modules import sd_models

            sd_models.unload_model(model)
            self._on_unload(self.model_id)


@serve.deployment(name=WORKER, max_ongoing_requests=1, graceful_shutdown_timeout_s=5,
                  health_check_period_s=5)
class SDWorker:
    """One engine: loads checkpoints (multiplexed), runs one job at a time, streams its steps back."""

    async def __init__(self, board, config: dict):
        refuse = config.get("refuse_start_file")  # tests: a replica that cannot come up
        if refuse and Path(refuse).exists():
            raise RuntimeError(f"worker start refused: {refuse} exists")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        if config.get("torch_threads"):
            torch.set_num_threads(int(config["torch_threads"]))
        self.board = board
        self.config = config
        ctx = serve.get_replica_context()
        self.id = ctx.replica_id.unique_id
        self.pid = os.getpid()
        self.node = ray.util.get_node_ip_address()
        self.device = _device_name()
        self.loaded: list[str] = []  # model ids, least recently used first
        self.running: dict | None = None
        self.jobs_done = 0
        self.started = time.time()
        self._get_model = serve.multiplexed(max_num_models_per_replica=int(config.get("models_per_worker", 2)))(
            self._make_loader())
        if config.get("default_model_id"):
            await self._get_model(config["default_model_id"])  # loaded once, before the first job
        self._report()
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _make_loader(self):
        async def load(model_id: str):
            from modules import sd_models

            model = await asyncio.to_thread(sd_models.load_model, model_id, **self.config.get("load_kwargs", {}))
            loaded = _Loaded(model, model_id, self._unloaded)
            self.loaded.append(model_id)
            self._report()
            return loaded

        return load

    def _unloaded(self, model_id: str) -> None:
        if model_id in self.loaded:
            self.loaded.remove(model_id)
        self._report()

    # -- reports ---------------------------------------------------------------------------------
    def info(self) -> dict:
        running = self.running
        job = None
        if running is not None:
            state = running["state"]
            job = {"id": running["job_id"], "kind": running["kind"], "step": state.sampling_step,
                   "steps": state.sampling_steps, "job_no": state.job_no, "job_count": state.job_count,
                   "try": running["try"]}
        return {"id": self.id, "state": "running" if running is not None else "idle", "job": job,
                "checkpoints": [Path(m).name for m in self.loaded], "model_ids": list(self.loaded),
                "device": self.device, "node": self.node, "pid": self.pid, "jobs_done": self.jobs_done,
                "up_s": round(time.time() - self.started, 1)}

    def _report(self) -> None:
        try:
            self.board.report.remote(self.info())
        except Exception:  # noqa: BLE001 - a report is best effort; the next heartbeat tries again
            pass

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            self._report()

    async def describe(self) -> dict:
        """This replica's report (for a caller that can wait for a free replica)."""
        return self.info()

    # -- a job -----------------------------------------------------------------------------------
    async def _apply_vae(self, loaded: _Loaded, vae: dict | None) -> None:
        if not vae:
            return
        key = (vae.get("setting"), str(vae.get("vae_path")), vae.get("overrides_per_model"))
        if loaded.vae_key == key:
            return
        from modules import sd_vae

        await asyncio.to_thread(sd_vae.apply_vae_setting, loaded.model, vae.get("setting"), vae.get("vaes") or [],
                                vae_path=vae.get("vae_path"), overrides_per_model=vae.get("overrides_per_model", True),
                                allow_pickle=bool(vae.get("allow_pickle")))
        loaded.vae_key = key

    async def run(self, job_id: str, job, vae: dict | None = None, try_no: int = 1):
        """Run one job: yield "started", one "step" message per sampling step, then "done" (or "error")."""
        from modules import processing
        from modules.job_state import JobState

        state = JobState()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        skips: set[int] = set()
        self.running = {"job_id": job_id, "kind": job.kind, "state": state, "try": try_no}
        info = self.info()
        yield {"kind": "started", "worker": info}
        self._report()
        watcher = None
        work = None
        try:
            watcher = loop.create_task(self._watch(job_id, state, skips))
            try:
                loaded = await self._get_model(serve.get_multiplexed_model_id())
                await self._apply_vae(loaded, vae)
            except BaseException as e:  # noqa: BLE001 - a checkpoint that does not load: the owner's 4xx
                if isinstance(e, asyncio.CancelledError):
                    raise
                yield {"kind": "error", "error": _picklable_error(e)}
                return

            def hook(step):
                if state.job_no in skips:  # a skip that arrived before its batch began
                    skips.discard(state.job_no)
                    state.skip()
                loop.call_soon_threadsafe(queue.put_nowait, step_message(step, state))

            def go():
                run = job.script.run if job.script is not None else processing.process_images
                return run(loaded.model, job.p, hooks=[hook], state=state)

            work = loop.run_in_executor(None, go)
            work.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
            while True:
                message = await queue.get()
                if message is None:
                    break
                yield message
            while not queue.empty():
                message = queue.get_nowait()
                if message is not None:
                    yield message
            try:
                processed = work.result()
            except BaseException as e:  # noqa: BLE001 - the job's error, raised again on the owner's side
                yield {"kind": "error", "error": _picklable_error(e)}
                return
            self.jobs_done += 1
            yield {"kind": "done", "processed": processed, "state": {k: getattr(state, k) for k in STATE_FIELDS},
                   "worker": self.id}
        except asyncio.CancelledError:  # the owner cancelled the request: stop the job, free the replica
            state.interrupt()
            if work is not None:
                try:
                    await asyncio.shield(work)
                except BaseException:  # noqa: BLE001 - the job ends either way
                    pass
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            self.running = None
            self._report()

    async def _watch(self, job_id: str, state, skips: set[int]) -> None:
        """Apply the owner's interrupt and skip signals (through the board) to the running job's state."""
        while True:
            try:
                stream = self.board.options(stream=True).watch.remote(job_id)
                async for kind, job_no in stream:
                    if kind == "interrupt":
                        state.interrupt()
                    elif kind == "skip":
                        if job_no is None or job_no == state.job_no:
                            state.skip()
                        elif job_no > state.job_no:
                            skips.add(job_no)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the board restarted: watch again
                await asyncio.sleep(0.5)


# -- the owner's side ------------------------------------------------------------------------------

@dataclasses.dataclass
class _Flight:
    """One job between `RayBackend.run` and its replica (the watcher thread reads it)."""

    job_id: str
    state: Any
    response: Any = None
    worker: dict | None = None  # the replica's report when it took the job (id, pid, device, ...)
    started: bool = False  # a replica took the current try
    ever_started: bool = False
    submitted: float = 0.0
    interrupt_sent: float | None = None
    skip_sent_for: int | None = None
    cancelled: str | None = None  # why the owner cancelled the current try: "interrupt", "unavailable: ..."
    signalled: bool = False


def _is_worker_death(e: BaseException) -> bool:
    return isinstance(e, (ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError))


class RayBackend:
    """The queue back-end `WebUIContext.run` delegates to: jobs go to Ray Serve replicas."""

    def __init__(self, ctx, *, workers: int | None = 2, min_workers: int | None = None,
                 max_workers: int | None = None, models_per_worker: int = 2, max_retries: int = 2,
                 num_gpus: float | None = None, load_kwargs: dict | None = None, app_name: str = APP_NAME,
                 torch_threads: int | None = None, refuse_start_file: str | None = None,
                 unavailable_after_s: float = UNAVAILABLE_AFTER_S, cancel_after_s: float = CANCEL_AFTER_S):
        """Deploy the workers on the Ray instance this process is connected to (`connect` first)."""
        self.ctx = ctx
        self.app_name = app_name
        self.max_retries = int(max_retries)
        self.unavailable_after_s = unavailable_after_s
        self.cancel_after_s = cancel_after_s
        self._flights: dict[str, _Flight] = {}
        self._lock = threading.Lock()
        self._closed = False
        if num_gpus is None:
            num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.num_gpus = num_gpus
        if load_kwargs is None:
            from modules import sd_models

            load_kwargs = sd_models.load_kwargs_from_args(ctx.args)
        if not num_gpus and load_kwargs.get("device") in (None, "cuda"):
            load_kwargs = {**load_kwargs, "device": "cpu"}  # a replica without a GPU samples on its CPU
        self.config = {"load_kwargs": load_kwargs, "models_per_worker": int(models_per_worker),
                       "default_model_id": self.default_model_id(), "torch_threads": torch_threads,
                       "refuse_start_file": refuse_start_file}
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1"}
        actor = {"num_cpus": 1, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}}
        options: dict[str, Any] = {"ray_actor_options": actor}
        if min_workers is not None or max_workers is not None:
            lo = int(min_workers if min_workers is not None else 1)
            hi = int(max_workers if max_workers is not None else max(lo, workers or 1))
            options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "target_ongoing_requests": 1,
                                             "initial_replicas": max(lo, min(hi, workers or lo))}
            self.replicas_wanted = f"{lo}..{hi} (autoscaling)"
        else:
            options["num_replicas"] = int(workers or 1)
            self.replicas_wanted = str(int(workers or 1))
        board = SDBoard.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env}}).bind()
        app = SDWorker.options(**options).bind(board, self.config)
        serve.start(proxy_location="Disabled")
        try:
            self.handle = serve.run(app, name=app_name, route_prefix=None)
        except Exception as e:  # noqa: BLE001 - Serve says why; the caller exits with it
            raise StartError(f"the workers did not start: {e}") from e
        self.board = serve.get_deployment_handle(BOARD, app_name=app_name)
        self._reports_cache: tuple[float, list[dict]] = (0.0, [])
        self._status_cache: tuple[float, dict] = (0.0, {})
        self._watcher = threading.Thread(target=self._watch, name="ray-jobs-watch", daemon=True)
        self._watcher.start()

    # -- jobs ----------------------------------------------------------------------------------
    def default_model_id(self) -> str | None:
        model = self.ctx.model
        return str(Path(model.path).resolve()) if model is not None else None

    def model_id(self, job) -> str:
        from modules.errors import InvalidParameter

        if job.checkpoint is not None:
            return str(Path(job.checkpoint.path).resolve())
        model_id = self.default_model_id()
        if model_id is None:
            raise InvalidParameter("No model is loaded: POST /sdapi/v1/reload-checkpoint or pick a checkpoint",
                                   field="sd_model_checkpoint")
        return model_id

    def vae_settings(self) -> dict:
        args = self.ctx.args
        return {"setting": self.ctx.options.get("sd_vae"), "vaes": list(self.ctx.vaes or []),
                "vae_path": getattr(args, "vae_path", None),
                "overrides_per_model": self.ctx.options.get("sd_vae_overrides_per_model_preferences", True),
                "allow_pickle": bool(getattr(args, "allow_pickle_checkpoints", False))}

    @staticmethod
    def fixed_seeds(job):
        """The job as it travels: random seeds (-1) drawn now, so every try makes the same images, and no
        checkpoint object (the model id names it). An X/Y/Z plot that asks for random seeds per cell
        (no_fixed_seeds) keeps them random."""
        from modules import processing

        p = copy.copy(job.p)
        script_args = None
        if job.script is not None:
            try:
                script_args = inspect.getclosurevars(job.script.run).nonlocals.get("args")
            except (TypeError, ValueError):
                script_args = None
        if not getattr(script_args, "no_fixed_seeds", False):
            p.seed, p.subseed = processing.fix_seed(p.seed), processing.fix_seed(p.subseed)
        return dataclasses.replace(job, p=p, checkpoint=None)

    def run(self, job, state, hooks=()):
        """Run the job on a replica (waits for one; `state` may be interrupted meanwhile), streaming its steps
        to `hooks` and `state` here, and return its Processed."""
        from modules.sd_samplers_common import call_hooks

        model_id = self.model_id(job)
        travelling = self.fixed_seeds(job)
        vae = self.vae_settings()
        flight = _Flight(uuid.uuid4().hex, state)
        with self._lock:
            self._flights[flight.job_id] = flight
        delivered = 0  # step messages the hooks have seen (a retry's replay of them is not shown again)
        failures = 0
        note: str | None = None
        try:
            while True:
                if state.interrupted and not flight.ever_started:
                    return self.empty_processed(travelling, state)
                flight.started, flight.cancelled, flight.submitted = False, None, time.time()
                flight.response = self.handle.options(stream=True, multiplexed_model_id=model_id,
                                                      method_name="run").remote(flight.job_id, travelling, vae,
                                                                                failures + 1)
                seen = 0
                try:
                    for message in flight.response:
                        kind = message["kind"]
                        if kind == "started":
                            flight.worker, flight.started = message["worker"], True
                            if not flight.ever_started:
                                flight.ever_started = True
                                state.begin(travelling.p.job_name, travelling.p.n_iter)
                            self._running(state)
                        elif kind == "step":
                            seen += 1
                            if seen <= delivered:
                                continue
                            self._mirror(state, message["state"], note)
                            info = step_info(message)
                            state.current_step_info = info
                            delivered = seen
                            try:
                                call_hooks(hooks, info)
                            except InterruptedException:  # a hook stops this pass, as in-process
                                state.skip()
                        elif kind == "error":
                            raise message["error"]
                        elif kind == "done":
                            self._mirror(state, message["state"], note)
                            processed = message["processed"]
                            if job.keep_checkpoint and job.checkpoint is not None:
                                self._keep(job.checkpoint)
                            return processed
                    raise RuntimeError("the worker's stream ended without a result")
                except (RequestCancelledError, TaskCancelledError, asyncio.CancelledError) as e:
                    reason = flight.cancelled or ""
                    if reason.startswith("unavailable"):
                        raise WorkersUnavailable(reason.split(":", 1)[1].strip()) from None
                    if state.interrupted or reason == "interrupt":
                        return self.empty_processed(travelling, state)
                    raise WorkerLost(f"The job was cancelled on its worker: {e}") from None
                except Exception as e:
                    if not _is_worker_death(e):
                        raise
                    if isinstance(e, ActorUnavailableError):  # it may still run: never twice at once
                        self._cancel(flight, "lost")
                    if not flight.started:  # the router sent it to a replica that had just died: not a try
                        time.sleep(0.2)
                        continue
                    failures += 1
                    who = (flight.worker or {}).get("id", "?")
                    if failures > self.max_retries:
                        raise WorkerLost(f"The job was lost: its worker died {failures} time(s) (last: worker {who}, "
                                         f"{type(e).__name__}); gave up after {self.max_retries} "
                                         f"retr{'y' if self.max_retries == 1 else 'ies'}. The server goes on "
                                         f"serving: send the job again.") from None
                    note = f"Worker {who} lost; {RETRY_NOTE} (try {failures + 1} of {self.max_retries + 1})"
                    state.textinfo = note
                    log.warning("job %s: worker %s died (%s); %s", flight.job_id, who, type(e).__name__, RETRY_NOTE)
        finally:
            with self._lock:
                self._flights.pop(flight.job_id, None)
            if flight.signalled:
                self._quiet(lambda: self.board.forget.remote(flight.job_id))
            if flight.ever_started:
                state.end()
            self._finished(state)

    def empty_processed(self, job, state):
        """What a job interrupted before a replica took it returns: no images, its parameters (as in-process)."""
        from modules.processing import Processed

        p = job.p
        count = p.batch_size * p.n_iter
        seeds = [p.seed + (i if p.subseed_strength == 0 else 0) for i in range(count)]
        model = self.ctx.model
        info = job.checkpoint or self.ctx.checkpoint
        return Processed(
            images=[], infotexts=[], prompt=p.prompt, negative_prompt=p.negative_prompt, seed=p.seed,
            subseed=p.subseed, all_prompts=[p.prompt] * count, all_negative_prompts=[p.negative_prompt] * count,
            all_seeds=seeds, all_subseeds=[p.subseed + i for i in range(count)],
            subseed_strength=p.subseed_strength, width=p.width, height=p.height, sampler_name=p.sampler_name,
            cfg_scale=p.cfg_scale, steps=p.steps, batch_size=p.batch_size, clip_skip=p.clip_skip,
            sd_model_name=getattr(info, "name", None) or (model.name if model is not None else ""),
            sd_model_hash=(model.shorthash if model is not None else ""), job_timestamp=state.job_timestamp,
            interrupted=True)

    @staticmethod
    def _mirror(state, fields: dict, note: str | None) -> None:
        """The replica's JobState fields on the owner's JobState (the progress API and the page read it)."""
        with state._lock:
            if fields["job_no"] > state.job_no:
                state.skipped = False  # next_batch() on the replica ended the skipped batch
            for name in STATE_FIELDS:
                if name == "textinfo" and note:
                    value = fields[name]
                    state.textinfo = f"{note} · {value}" if value else note
                elif name != "job" or fields[name]:
                    setattr(state, name, fields[name])

    def _running(self, state) -> None:
        """The progress and interrupt APIs follow the job that started last (one of many, here)."""
        self.ctx.current_state = state

    def _finished(self, state) -> None:
        if getattr(self.ctx, "current_state", None) is state:
            with self._lock:
                others = [f.state for f in self._flights.values() if f.started]
            self.ctx.current_state = others[-1] if others else None

    def _keep(self, checkpoint) -> None:
        """override_settings_restore_afterwards=False: the job's checkpoint becomes the default for new jobs."""
        try:
            if not self.ctx.is_current(checkpoint):
                self.ctx.load_model(checkpoint.path)
        except UserError as e:
            log.warning("could not make %s the default checkpoint: %s", checkpoint.title, e)

    def worker_of(self, state) -> dict | None:
        """The report of the replica running the job of `state` (tests use its pid), or None."""
        with self._lock:
            for f in self._flights.values():
                if f.state is state and f.started:
                    return f.worker
        return None

    # -- interrupt, skip, jobs that wait for nobody ----------------------------------------------
    @staticmethod
    def _quiet(call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a signal is best effort; cancellation backs it up
            log.debug("ray call failed: %s", e)

    def _cancel(self, flight: _Flight, reason: str) -> None:
        flight.cancelled = flight.cancelled or reason
        response = flight.response
        if response is not None:
            self._quiet(response.cancel)

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL_S)
            with self._lock:
                flights = list(self._flights.values())
            now = time.time()
            for f in flights:
                try:
                    self._check(f, now)
                except Exception:  # noqa: BLE001 - one job's trouble must not stop the others' signals
                    log.exception("watching job %s", f.job_id)

    def _check(self, f: _Flight, now: float) -> None:
        state = f.state
        if f.response is None:
            return
        if state.interrupted:
            if not f.started and f.cancelled is None:
                self._cancel(f, "interrupt")  # still queued: it never reaches a replica
            elif f.started and f.interrupt_sent is None:
                f.interrupt_sent, f.signalled = now, True
                self._quiet(lambda: self.board.signal.remote(f.job_id, "interrupt"))
            elif f.started and f.cancelled is None and now - f.interrupt_sent > self.cancel_after_s:
                self._cancel(f, "interrupt")  # the signal was not acted on: stop it the hard way
        elif state.skipped and f.started and f.skip_sent_for != state.job_no:
            f.skip_sent_for, f.signalled = state.job_no, True
            self._quiet(lambda: self.board.signal.remote(f.job_id, "skip", state.job_no))
        if not f.started and f.cancelled is None and now - f.submitted > self.unavailable_after_s:
            status = self.status()
            if status.get("running", 0) == 0:
                cause = status.get("message") or f"deployment {status.get('status', 'unknown')}"
                self._cancel(f, f"unavailable: No worker is running to take the job after waiting "
                                f"{now - f.submitted:.0f} s ({status.get('running', 0)} of {self.replicas_wanted} "
                                f"replicas up; Ray Serve says: {cause})")

    # -- operations ----------------------------------------------------------------------------
    def status(self, max_age: float = 1.0) -> dict:
        """The workers' deployment as Serve sees it: {status, running, replica_states, message}."""
        when, cached = self._status_cache
        if time.time() - when < max_age:
            return cached
        try:
            app = serve.status().applications.get(self.app_name)
            dep = app.deployments.get(WORKER) if app is not None else None
            if dep is None:
                result = {"status": "NOT_DEPLOYED", "running": 0, "replica_states": {}, "message": ""}
            else:
                states = {str(getattr(k, "value", k)): v for k, v in dict(dep.replica_states).items()}
                result = {"status": str(getattr(dep.status, "value", dep.status)), "running": states.get("RUNNING", 0),
                          "replica_states": states, "message": dep.message or ""}
        except Exception as e:  # noqa: BLE001 - the controller is unreachable: say so
            result = {"status": "UNKNOWN", "running": 0, "replica_states": {}, "message": f"{type(e).__name__}: {e}"}
        self._status_cache = (time.time(), result)
        return result

    def workers(self, max_age: float = 1.0) -> list[dict]:
        """Each replica's last report, newest state first seen by the board:

        {"id", "state": "idle" | "running" | "lost", "job": None | {"id", "kind", "step", "steps", "job_no",
        "job_count", "try"}, "checkpoints": [names], "model_ids": [paths], "device", "node", "pid",
        "jobs_done", "up_s", "seen_s_ago"}. A replica silent for LOST_AFTER_S is "lost" (it died; Serve
        starts another in its place), and is dropped after FORGET_AFTER_S.
        """
        when, cached = self._reports_cache
        if time.time() - when < max_age:
            return cached
        try:
            reports = self.board.reports.remote().result(timeout_s=5)
        except Exception as e:  # noqa: BLE001 - the panel and /memory say the board is not answering
            log.debug("worker reports: %s", e)
            return cached
        for r in reports:
            if r["seen_s_ago"] > LOST_AFTER_S:
                r["state"], r["job"] = "lost", None
        reports.sort(key=lambda r: (r["state"] == "lost", r["id"]))
        self._reports_cache = (time.time(), reports)
        return reports

    def shutdown(self, keep_ray: bool = False) -> None:
        """Delete the workers (their GPUs go back to the cluster); end the local Ray instance unless kept."""
        self._closed = True
        self._quiet(lambda: serve.delete(self.app_name))
        if not keep_ray and _STARTED_LOCAL:
            self._quiet(serve.shutdown)
            self._quiet(ray.shutdown)


# -- start-up ---------------------------------------------------------------------------------------

_STARTED_LOCAL = False


def _reachable(address: str) -> None:
    """A quick TCP check of --ray-address (ray.init would retry for minutes before saying anything)."""
    if address in ("auto", "local"):
        return
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise StartError(f"--ray-address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise StartError(f"Ray is not reachable at --ray-address {address}: {e}. Start the cluster's head "
                         f"(`ray start --head`) or give its GCS address (host:6379)") from None


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, or start a local Ray instance on loopback (no dashboard, no network)."""
    global _STARTED_LOCAL
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        "HF_HUB_OFFLINE": "1"}}
    if address:
        _reachable(address)
        done: dict[str, Any] = {}

        def join():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=False, runtime_env=env,
                         configure_logging=False)
                done["ok"] = True
            except Exception as e:  # noqa: BLE001 - reported below
                done["error"] = e

        t = threading.Thread(target=join, daemon=True)
        t.start()
        t.join(CONNECT_TIMEOUT_S)
        if "ok" not in done:
            why = done.get("error", f"no answer within {CONNECT_TIMEOUT_S:.0f} s")
            raise StartError(f"could not join the Ray cluster at --ray-address {address}: {why}")
        return
    ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             num_cpus=num_cpus or os.cpu_count(), runtime_env=env, configure_logging=False)
    _STARTED_LOCAL = True


def start(ctx, args) -> RayBackend:
    """--workers / --ray-address: connect (or start Ray), deploy the workers, return the back-end."""
    workers = getattr(args, "workers", None) or None
    lo, hi = getattr(args, "min_workers", None), getattr(args, "max_workers", None)
    connect(getattr(args, "ray_address", None),
            num_cpus=max(os.cpu_count() or 1, (workers or 0) + 1, (hi or 0) + 1))
    if workers is None and lo is None and hi is None:
        workers = 1
    return RayBackend(ctx, workers=workers, min_workers=lo, max_workers=hi,
                      models_per_worker=getattr(args, "models_per_worker", 2),
                      max_retries=getattr(args, "max_retries", 2))
