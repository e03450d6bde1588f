# SPDX-License-Identifier: Apache-2.0
"""API-server side of KV mirroring: starts, connects, watches and restarts the
standby engine, and publishes the mirror's state (``/mirror``, ``/metrics``).

The standby is a child of the API server process, not of the primary engine, so it
survives the primary's death (failover, issue 4). A standby that dies or falls over is
never the primary's problem: the supervisor tells the primary to stop mirroring (its
pinned blocks are released), logs it, reports ``down``, and starts a new standby that
catches up from the primary's prefix cache.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm.ha.metrics import ProcessMetrics

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)

STANDBY_START_TIMEOUT_S = 900.0  # model load + compile + graphs, on a busy host
CALL_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5
# A standby that does not answer its status, or leaves a step unconfirmed this long, is
# treated as lost (restarted): alive but stuck would otherwise keep blocks pinned.
STANDBY_STATUS_TIMEOUT_S = 10.0
STANDBY_STALL_TIMEOUT_S = 30.0
MAX_BACKOFF_S = 30.0


class MirrorCallError(Exception):
    """A ``/mirror`` admin call the state or the settings do not allow (an HTTP status)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class StandbyPromoted(Exception):
    """The watched standby was promoted to primary (ends the watch, not a fault)."""


class StandbyReleased(Exception):
    """Paused with the standby stopped on request (ends the watch, not a fault)."""


class MirrorStartupError(ValueError):
    """Bad mirror settings for this host; raised before any engine starts."""


def _primary_device(vllm_config: VllmConfig) -> tuple[str, int]:
    """(the primary's device, CUDA devices visible to this server)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "cpu", 0
    return "cuda:0", current_platform.device_count()


def _standby_cuda_visible(peer_index: int) -> str:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return str(peer_index)
    return visible.split(",")[peer_index].strip()


@dataclass
class MirrorState:
    """What ``GET /mirror`` reports (JSON)."""

    # starting | syncing | in_sync | paused | down | failing_over | stopped
    state: str = "starting"
    peer: str = ""
    transport: str = ""
    primary: dict[str, Any] = field(default_factory=dict)
    standby: dict[str, Any] = field(default_factory=dict)
    lag_blocks: int = 0
    backlog_blocks: int = 0
    blocks_mirrored: int = 0
    bytes_mirrored: int = 0
    blocks_failed: int = 0
    # The primary worker's time posting and polling WRITEs: GIL time its loop lost.
    push_seconds: float = 0.0
    standby_restarts: int = 0
    failovers: int = 0
    # Death detected -> requests resubmitted on the promoted standby, and what the
    # resubmitted requests recomputed (tokens not served by the prefix cache).
    last_failover: dict[str, Any] | None = None
    last_error: str | None = None
    updated_at: float = 0.0


class MirrorMetrics(ProcessMetrics):
    """Prometheus series of the mirror, in the API server's registry."""


    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.blocks = Counter("vllm:mirror_blocks_total",
                              "KV blocks copied to the standby engine.")
        self.bytes = Counter("vllm:mirror_bytes_total",
                             "Bytes of KV cache copied to the standby engine.")
        self.failed = Counter("vllm:mirror_blocks_failed_total",
                              "KV blocks whose copy to the standby failed or was dropped.")
        self.push_seconds = Counter(
            "vllm:mirror_push_seconds_total",
            "Time the primary's worker spent posting and polling mirror writes (it holds "
            "the Python GIL the engine loop also needs: the mirror's CPU cost).")
        self.lag = Gauge("vllm:mirror_lag_blocks",
                         "KV blocks filled on the primary and not yet on the standby.")
        self.standby_up = Gauge("vllm:mirror_standby_up",
                                "1 while the standby engine is connected and mirroring.")
        self.paused = Gauge("vllm:mirror_paused",
                            "1 while mirroring is paused by an operator (POST /mirror/pause).")
        self.in_sync = Gauge("vllm:mirror_in_sync",
                             "1 while the standby holds every full block of the primary "
                             "up to the steps in flight (catch-up finished).")
        self.restarts = Counter("vllm:mirror_standby_restarts_total",
                                "Standby engines started after the first.")
        self.failovers = Counter("vllm:mirror_failovers_total",
                                 "Primary engine deaths survived by promoting the standby.")
        self.failover_seconds = Histogram(
            "vllm:mirror_failover_seconds",
            "From the primary's death seen by the API server to every in-flight request "
            "resubmitted on the promoted standby.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
        self.resumed = Counter("vllm:mirror_failover_resumed_requests_total",
                               "In-flight requests continued on the promoted standby.")
        self.recomputed = Histogram(
            "vllm:mirror_failover_recomputed_tokens",
            "Per resumed request: tokens the new engine computed again (not prefix-cache "
            "hits from mirrored blocks).",
            buckets=(0, 1, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384))
        self.refused = Counter("vllm:mirror_requests_refused_total",
                               "Requests refused with 503 while unprotected "
                               "(--mirror-required).")
        self.transfer = Histogram(
            "vllm:mirror_transfer_seconds",
            "Time from a step's scheduling to its blocks confirmed on the standby.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                     2.5, 5.0))
        self.lag_steps = Histogram(
            "vllm:mirror_lag_steps",
            "Per mirrored step: forwards the primary launched after the step's own "
            "before its blocks were on the standby (what a failover would recompute).",
            buckets=(0, 1, 2, 3, 4, 8, 16, 32, 64))
        self.confirm_steps = Histogram(
            "vllm:mirror_confirm_steps",
            "Per mirrored step: engine steps from its scheduling until the scheduler "
            "learned its blocks were on the standby (and unpinned them).",
            buckets=(0, 1, 2, 3, 4, 8, 16, 32, 64))



class StandbyEngine:
    """The standby: an upstream ``EngineCoreProc`` behind its own ``AsyncMPClient``
    (so that, promoted, it serves with upstream's loop), driven through utility calls
    from the supervisor thread (:meth:`request`) or the event loop (:meth:`call`)."""

    def __init__(self, vllm_config: VllmConfig, loop: asyncio.AbstractEventLoop,
                 cuda_visible: str | None) -> None:
        self.vllm_config = vllm_config
        self.loop = loop
        self.cuda_visible = cuda_visible
        self.client: Any = None
        self.pid: int | None = None
        # stop() runs from the supervisor thread and from AsyncLLM.shutdown (which
        # upstream may call twice): once only.
        self._stop_lock = threading.Lock()
        self._stopping = False
        self._stopped = threading.Event()
        self._children_before: set[int] = set()

    def start(self) -> None:
        """Start the engine and wait until it is up (model loaded, KV cache sized)."""
        import psutil
        from vllm.v1.engine.core_client import AsyncMPClient
        from vllm.v1.executor import Executor

        from vllm.v1.engine.mirror_standby import STANDBY_TITLE_PREFIX

        # The engine process inherits the environment when it starts: title prefix,
        # device, and spawn (forking this threaded server is unsafe). The variables
        # are swapped back once the client is up; nothing else in this process reads
        # them meanwhile.
        env = {"VLLM_PROCESS_NAME_PREFIX": STANDBY_TITLE_PREFIX,
               "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
        if self.cuda_visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible
        self._children_before = {p.pid for p in psutil.Process().children()}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            # Stats on: promoted, it feeds the server's /metrics like the primary did.
            client = AsyncMPClient(vllm_config=self.vllm_config,
                                   executor_class=Executor.get_class(self.vllm_config),
                                   log_stats=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        with self._stop_lock:
            if self._stopping:  # shutdown began while it was starting
                client.shutdown(timeout=5)
                raise RuntimeError("server shutting down")
            self.client = client
        procs = client.resources.engine_manager.processes
        self.pid = procs[0].pid if procs else None

    def alive(self) -> bool:
        return self.client is not None and not self.client.resources.engine_dead

    async def call(self, method: str, *args: Any) -> Any:
        """A utility call from the event loop."""
        if not self.alive():
            raise RuntimeError("the standby engine is not running")
        return await self.client.call_utility_async(method, *args)

    def request(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """A utility call from another thread; raises if the standby errs, dies or
        does not answer in ``timeout`` s."""
        if not self.alive():
            raise RuntimeError("the standby engine is not running")
        fut = asyncio.run_coroutine_threadsafe(self.call(method, *args), self.loop)
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fut.result(0.1)
            except concurrent.futures.TimeoutError:
                pass
            if self._stopping:
                fut.cancel()
                raise RuntimeError("standby engine stopping")
            if not self.alive():
                fut.cancel()  # a dead engine's pending calls are never answered
                raise RuntimeError("standby engine exited")
            if time.monotonic() > deadline:
                fut.cancel()
                raise TimeoutError(f"standby did not answer {method!r} in {timeout:.0f} s")

    def detach(self) -> Any:
        """Hand the engine over (promotion): this object no longer stops it."""
        with self._stop_lock:
            client, self.client = self.client, None
            self._stopping = True
        self._stopped.set()
        return client

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine (SIGTERM, then SIGKILL); idempotent and safe from several
        threads, also while it is still starting."""
        with self._stop_lock:
            if self._stopping:
                # Someone else is stopping it: return once it is actually gone.
                self._stopped.wait(timeout + 15)
                return
            self._stopping = True
            client = self.client
        try:
            if client is None:
                self._kill_starting()
            else:
                tree = self._process_tree()
                if self.pid is not None:
                    try:  # a stopped (SIGSTOP) process acts on SIGTERM only once continued
                        os.kill(self.pid, signal.SIGCONT)
                    except OSError:
                        pass
                client.shutdown(timeout=timeout)
                self._reap(tree)
        finally:
            self._stopped.set()

    def _process_tree(self) -> list[Any]:
        import psutil

        if self.pid is None:
            return []
        try:
            engine = psutil.Process(self.pid)
            return [engine, *engine.children(recursive=True)]
        except psutil.Error:
            return []

    @staticmethod
    def _reap(tree: list[Any]) -> None:
        """Workers the engine left behind (force-killed while they were busy, e.g. in
        a long RPC) still hold the device's memory, and a new standby on the same GPU
        could not start: kill them and wait until they are gone."""
        import psutil

        def running(p: Any) -> bool:
            # A zombie holds no memory; its reaper may be a parent that is gone.
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        alive = [p for p in tree if running(p)]
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        deadline = time.monotonic() + 15
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [p for p in alive if running(p)]
        if alive:
            logger.warning("mirror: standby process(es) %s did not exit",
                           [p.pid for p in alive])

    def _kill_starting(self) -> None:
        """The client is still waiting for the engine: kill the process it started
        (the client's constructor then fails)."""
        import psutil

        for child in psutil.Process().children():
            if child.pid not in self._children_before:
                for p in [*child.children(recursive=True), child]:
                    try:
                        p.kill()
                    except psutil.Error:
                        pass


class MirrorSupervisor:
    """Owns the standby engine for the lifetime of the API server."""

    def __init__(self, vllm_config: VllmConfig, engine_core: Any,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.vllm_config = vllm_config
        self.config = vllm_config.mirror_config
        self.engine_core = engine_core
        self.loop = loop
        self.metrics = MirrorMetrics.get()
        device, _ = _primary_device(vllm_config)
        peer = self.config.peer_device
        self.state = MirrorState(peer=str(peer), transport=self.config.transport,
                                 primary={"device": device})
        self._cuda_visible = (_standby_cuda_visible(peer.index)
                              if peer.kind == "cuda" else None)
        self._primary_cuda_visible = (_standby_cuda_visible(0)
                                      if peer.kind == "cuda" else None)
        self._failover_started = 0.0
        self.standby: StandbyEngine | None = None
        # Held while the standby is handed over to failover, so the supervising
        # thread neither stops it nor starts another meanwhile.
        self._standby_lock = threading.Lock()
        self.failover: Any = None  # FailoverEngineCoreClient, set by maybe_start
        self._stop = threading.Event()
        # Set by POST /mirror/pause|resume (and /checkpoint); the supervising thread
        # acts on it. _release_standby: paused with the standby stopped (its memory
        # freed), a new one started on resume.
        self._want_paused = False
        self._release_standby = False
        # Debug calls (verify, lookup) in progress on the standby's busy loop: its
        # status waits behind them, which is not a stuck standby.
        self._standby_debug_calls = 0
        self._last: dict[str, float] = {}
        self._poll_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="MirrorSupervisor",
                                        daemon=True)

    # -- construction hooks (patch 0007) ------------------------------------------------

    @staticmethod
    def prepare(vllm_config: VllmConfig) -> None:
        """Checks and environment, before any engine starts: a bad setting fails the
        server here, naming its flag, with nothing started half-way."""
        config = getattr(vllm_config, "mirror_config", None)
        if config is None:
            return
        device, num_cuda = _primary_device(vllm_config)
        peer = config.peer_device
        if peer.kind == "cpu" and device != "cpu":
            raise MirrorStartupError(
                "--mirror-peer cpu runs the standby on the host, which needs the CPU "
                "build of vLLM-HA; on a GPU server use --mirror-peer cuda:N")
        try:
            config.check_devices(device, num_cuda)
        except ValueError as e:
            raise MirrorStartupError(str(e)) from None
        parallel = vllm_config.parallel_config
        if (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                parallel.data_parallel_size) != (1, 1, 1):
            raise MirrorStartupError(
                "--mirror-peer supports one engine of one worker for now "
                "(tensor, pipeline and data parallel size 1)")
        if parallel._api_process_count > 1:
            # Each API server would start and supervise a standby of its own.
            raise MirrorStartupError(
                "--mirror-peer needs a single API server (drop --api-server-count "
                f"{parallel._api_process_count})")
        try:
            import nixl._api  # noqa: F401
        except ImportError as e:
            raise MirrorStartupError(
                f"--mirror-peer needs NIXL ({e}): pip install 'vllm[nixl]'") from None
        # Failover's proof that a resumed request's output is its own (failover.py).
        os.environ.setdefault("VLLM_HA_RESUME_KEY", secrets.token_hex(16))
        if os.environ.get("PYTHONHASHSEED") in (None, "", "random"):
            # Primary and standby must hash blocks alike; children inherit this.
            os.environ["PYTHONHASHSEED"] = str(random.randrange(1, 2**32))
            logger.info("mirror: PYTHONHASHSEED=%s for the primary and its standby "
                        "(set it yourself to keep it across restarts)",
                        os.environ["PYTHONHASHSEED"])

    @classmethod
    def maybe_start(cls, vllm_config: VllmConfig, engine_core: Any,
                    output_processor: Any = None, renderer: Any = None
                    ) -> tuple[Any, MirrorSupervisor | None]:
        """(the engine client AsyncLLM should use, the supervisor): without a mirror,
        the client unchanged and None; with one, the client wrapped for failover."""
        if getattr(vllm_config, "mirror_config", None) is None:
            return engine_core, None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise MirrorStartupError(
                "--mirror-peer needs the API server (vllm serve): the standby is "
                "driven from its event loop") from None
        from vllm.v1.engine.mirror_failover import FailoverEngineCoreClient

        so = vllm_config.structured_outputs_config
        client = FailoverEngineCoreClient(
            engine_core, output_processor, renderer,
            reasoning_gates_grammar=bool(so.reasoning_parser) and not so.enable_in_reasoning)
        supervisor = cls(vllm_config, client, loop)
        client.supervisor = supervisor
        supervisor.failover = client
        # Before the supervisor's thread: a standby start kills the children that
        # appear meanwhile if it is stopped half-way.
        client.start_exit_watch(loop)
        supervisor._thread.start()
        return client, supervisor

    # -- calls into the primary engine ---------------------------------------------------

    def _call_primary(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S
                      ) -> Any:
        fut = asyncio.run_coroutine_threadsafe(
            self.engine_core.call_utility_async(method, *args), self.loop)
        return fut.result(timeout)

    # -- the supervising thread ---------------------------------------------------------

    def _run(self) -> None:
        backoff = 1.0
        first = True
        while not self._stop.is_set():
            if self._want_paused and self._release_standby:
                self.state.state = "paused"
                self._stop.wait(WATCH_INTERVAL_S)
                continue
            try:
                self._start_standby(restart=not first)
                first = False
                self._connect_unless_paused()
                backoff = 1.0
                self._watch()
            except StandbyPromoted:
                # Not a fault: the standby serves now; a new one starts for it.
                logger.info("mirror: the standby became the primary (failover); "
                            "starting a new standby")
            except StandbyReleased:
                # Stopped before it is forgotten: the pause call returns once its
                # memory is free (paused, no failover can claim it meanwhile).
                if self.standby is not None:
                    self.standby.stop()
                with self._standby_lock:
                    self.standby = None
                logger.info("mirror: standby stopped while paused; a new one starts on "
                            "resume")
                backoff = 1.0
                continue
            except Exception as e:
                if self._stop.is_set():
                    break
                self.state.last_error = f"{type(e).__name__}: {e}"
                logger.warning("mirror: standby down (%s); the primary serves "
                               "unprotected; retrying in %.0f s",
                               self.state.last_error, backoff)
            self._down()
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, MAX_BACKOFF_S)
        self.state.state = "stopped"

    def _start_standby(self, restart: bool) -> None:
        import copy

        from vllm.utils.network_utils import get_open_zmq_ipc_path

        cfg = copy.deepcopy(self.vllm_config)
        # mirror_config stays: promoted, the standby mirrors to a standby of its own.
        # The standby serves nothing: the user's KV connector and KV event publisher
        # stay with the primary (a second instance would bind the same side channel
        # or endpoint and fight over the same peer identity).
        cfg.kv_transfer_config = None
        cfg.kv_events_config = None
        cfg.cache_config.enable_prefix_caching = True
        cfg.cache_config.num_gpu_blocks_override = self.vllm_config.cache_config.num_gpu_blocks
        self.state.state = "starting"
        if restart:
            self.state.standby_restarts += 1
            self.metrics.restarts.inc()
        staging = self.config.staging_mib << 20
        standby = StandbyEngine(cfg, self.loop, self._cuda_visible)
        with self._standby_lock:
            if self._stop.is_set():
                raise RuntimeError("server shutting down")
            self.standby = standby
        logger.info("mirror: starting the standby engine on %s", self.state.peer)
        t0 = time.monotonic()
        standby.start()
        self._ops_address = get_open_zmq_ipc_path()
        hello = standby.request("mirror_standby_open", self.config.transport, staging,
                                self._ops_address)
        logger.info("mirror: standby engine up in %.1f s (pid %d)",
                    time.monotonic() - t0, hello["pid"])
        self.state.standby = {"pid": hello["pid"], "device": self.state.peer,
                              "num_blocks": hello["num_blocks"]}
        self._workers = hello["workers"]

    def _connect(self) -> None:
        metadata = self._call_primary("mirror_prepare", self._workers, self.config.transport)
        self.standby.request("mirror_standby_connect", metadata)
        bytes_per_block = sum(r["block_bytes"] for r in self._workers[0]["regions"])
        queued = self._call_primary("mirror_start", self._ops_address, bytes_per_block)
        self.state.state = "syncing" if queued else "in_sync"
        self.metrics.standby_up.set(1)
        logger.info("mirror: standby %d connected over %s (%s transport); %d cached "
                    "block(s) to catch up", self.standby.pid, self.state.peer,
                    self.config.transport, queued)

    def _connect_unless_paused(self) -> None:
        if self._want_paused:
            self._pause()
        else:
            self._connect()

    def _pause(self) -> None:
        """Stop mirroring, keep the standby running. What the standby holds is not
        trusted afterwards (copies in flight were cut): the next connection resets it
        and catches up from the primary's prefix cache, as a new standby would."""
        self._call_primary("mirror_stop")
        self.state.state = "paused"
        self.metrics.standby_up.set(0)
        self.metrics.in_sync.set(0)
        logger.warning("mirror: paused by request; the primary serves unprotected until "
                       "POST /mirror/resume")

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            standby = self.standby
            if standby is None:
                raise StandbyPromoted
            if not standby.alive():
                raise RuntimeError("standby engine exited")
            paused = self.state.state == "paused"
            if self._want_paused != paused:
                if paused:
                    logger.info("mirror: resumed by request")
                    self._connect()
                else:
                    self._pause()
            if self.state.state == "paused" and self._release_standby:
                raise StandbyReleased
            if self.state.state == "paused":
                continue
            p = self.poll()
            if p["dropped"]:
                raise RuntimeError(f"the primary dropped the standby: {p['dropped']}")
            if p["oldest_unconfirmed_s"] > STANDBY_STALL_TIMEOUT_S:
                raise RuntimeError(
                    f"standby stalled: a step unconfirmed for {p['oldest_unconfirmed_s']:.0f} s")

    def _status_of_primary(self) -> dict[str, Any]:
        """The primary's mirror status; a primary that answers nothing for
        ``--mirror-step-timeout`` while it has requests in flight and produced no
        output for as long (a hung step, not a long utility on an idle engine), with
        a standby to take over, is killed: its requests fail over."""
        timeout = self.config.step_timeout
        fut = asyncio.run_coroutine_threadsafe(
            self.engine_core.call_utility_async("mirror_status"), self.loop)
        t0 = time.monotonic()
        while True:
            try:
                return fut.result(0.5)
            except concurrent.futures.TimeoutError:
                pass
            waited = time.monotonic() - t0
            if waited > CALL_TIMEOUT_S:
                fut.cancel()
                raise TimeoutError(f"the primary did not answer its status in {waited:.0f} s")
            if not timeout or waited < timeout or not self.can_fail_over():
                continue
            silent = (self.failover.seconds_since_output()
                      if self.failover is not None else 0.0)
            pid = self.state.primary.get("pid")
            if pid is None or silent < timeout:
                continue
            fut.cancel()
            logger.error("mirror: the primary engine (pid %d) has produced nothing and "
                         "answered nothing for %.0f s with requests in flight "
                         "(--mirror-step-timeout); killing it to fail over", pid, waited)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            # The death is seen within milliseconds; the standby must be handed over
            # before this thread's error handling would stop it.
            deadline = time.monotonic() + 10
            while self.standby is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            raise RuntimeError("primary engine unresponsive; killed for failover") from None

    def poll(self) -> dict[str, Any]:
        """Refresh state and metrics from both engines; returns the primary's status."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> dict[str, Any]:
        p = self._status_of_primary()
        standby = self.standby
        if standby is None:
            raise RuntimeError("no standby engine")
        st = self.state
        if not self._standby_debug_calls:
            s = standby.request("mirror_standby_status", timeout=STANDBY_STATUS_TIMEOUT_S)
            st.standby.update(lag_steps=s["lag_steps"], cached_blocks=s["cached_blocks"],
                              blocks_published=s["blocks_published"])
        st.primary["pid"] = p["pid"]
        for key, counter in (("blocks_mirrored", self.metrics.blocks),
                             ("bytes_mirrored", self.metrics.bytes),
                             ("blocks_failed", self.metrics.failed),
                             ("push_seconds", self.metrics.push_seconds)):
            delta = p[key] - self._last.get(key, 0)
            if delta > 0:
                counter.inc(delta)
            self._last[key] = p[key]
            setattr(st, key, p[key])
        for v in p["transfer_seconds"]:
            self.metrics.transfer.observe(v)
        for v in p["lag_steps"]:
            self.metrics.lag_steps.observe(v)
        for v in p["confirm_steps"]:
            self.metrics.confirm_steps.observe(v)
        st.lag_blocks, st.backlog_blocks = p["lag_blocks"], p["backlog_blocks"]
        self.metrics.lag.set(p["lag_blocks"] + p["backlog_blocks"])
        if p["connected"]:
            st.state = "syncing" if p["backlog_blocks"] else "in_sync"
        self.metrics.in_sync.set(1 if st.state == "in_sync" else 0)
        st.updated_at = time.time()
        return p

    def _down(self) -> None:
        self.state.state = "down"
        self.metrics.standby_up.set(0)
        self.metrics.in_sync.set(0)
        if not self._stop.is_set():  # on shutdown the primary is going away too
            try:
                self._call_primary("mirror_stop", timeout=10)
            except Exception as e:
                logger.debug("mirror: primary mirror_stop failed: %s", e)
        with self._standby_lock:
            standby, self.standby = self.standby, None
        if standby is not None:
            standby.stop()

    # -- failover (FailoverEngineCoreClient, event loop thread) --------------------------

    @property
    def paused(self) -> bool:
        return self._want_paused

    async def set_paused(self, paused: bool, release_standby: bool = False,
                         timeout: float = CALL_TIMEOUT_S) -> dict[str, Any]:
        """``POST /mirror/pause`` / ``/mirror/resume``: returns the status once the
        supervising thread has acted (a resumed mirror reports ``syncing`` while it
        catches up, ``starting`` if its standby was released). ``release_standby``:
        the standby is stopped too (its memory freed; a new one starts on resume).
        Pausing is refused with ``--mirror-required``: the server would refuse every
        request until resumed."""
        if paused and self.config.required:
            raise MirrorCallError(409, "this server runs with --mirror-required: pausing "
                                       "the mirror would refuse every request")
        st = self.state
        if st.state in ("failing_over", "stopped"):
            raise MirrorCallError(409, f"the mirror is {st.state}")
        if paused:
            self._release_standby = release_standby or (
                self._want_paused and self._release_standby)
        self._want_paused = paused
        self.metrics.paused.set(1 if paused else 0)  # what was asked, as /mirror says
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if paused and st.state == "paused" and not (
                    self._release_standby and self.standby is not None):
                break
            # Resumed, or the standby is (re)starting and connects when up.
            if not paused and st.state != "paused":
                self._release_standby = False
                break
            await asyncio.sleep(0.05)
        else:
            raise MirrorCallError(503, f"the mirror supervisor did not act in {timeout:.0f} "
                                       f"s (state {st.state}); the request stands")
        return self.status()

    def can_fail_over(self) -> bool:
        standby = self.standby
        return self.protected and standby is not None and standby.alive()

    def claim_standby(self) -> Any | None:
        """The primary died: hand over the standby's engine client if it holds the
        primary's KV (connected and mirroring), else None."""
        with self._standby_lock:
            standby = self.standby
            if not self.can_fail_over():
                return None
            self.standby = None
            client = standby.detach()
            # The next standby goes where the old primary was (its memory is free
            # now); swapped here, before this thread can start one.
            st = self.state
            old_primary = st.primary.get("device", "cpu")
            st.primary = {"device": st.peer}
            st.standby = {}
            if self._cuda_visible is not None:
                st.peer = old_primary
                self._cuda_visible, self._primary_cuda_visible = (
                    self._primary_cuda_visible, self._cuda_visible)
        self.state.state = "failing_over"
        self.metrics.standby_up.set(0)
        self.metrics.in_sync.set(0)
        self._failover_started = time.time()
        return client

    def on_promoted(self, promoted: dict[str, Any], *, seconds: float, resumed: int,
                    refused: int) -> None:
        """The standby serves: it is the primary now; a new standby is started (on
        the old primary's device) and catches up from its prefix cache."""
        st = self.state
        st.failovers += 1
        if st.state == "failing_over":  # the supervisor may be starting a new one
            st.state = "down"
        st.last_failover = {
            "at": self._failover_started, "seconds": round(seconds, 4),
            "requests_resumed": resumed, "requests_refused": refused,
            "blocks_published": promoted.get("blocks_published"),
            "blocks_held_back": promoted.get("blocks_held"),
            "recomputed_tokens": 0, "recomputed_tokens_max": 0, "resumed_tokens": 0,
        }
        st.primary["pid"] = promoted.get("pid")
        self._last = {}  # the new primary's counters start at zero
        self.metrics.failovers.inc()
        self.metrics.failover_seconds.observe(seconds)
        self.metrics.resumed.inc(resumed)

    def on_resumed_request(self, recomputed: int, total: int) -> None:
        self.metrics.recomputed.observe(recomputed)
        last = self.state.last_failover
        if last is not None:
            last["recomputed_tokens"] += recomputed
            last["resumed_tokens"] += total
            last["recomputed_tokens_max"] = max(last["recomputed_tokens_max"], recomputed)

    def on_primary_lost(self, reason: str | None = None) -> None:
        """The primary died with nothing to fail over to: both engines are down."""
        self.state.state = "down"
        self.state.primary["state"] = "dead"
        self.state.last_error = reason or "the primary engine died while unprotected"
        self._stop.set()
        with self._standby_lock:
            standby, self.standby = self.standby, None
        if standby is not None:
            threading.Thread(target=standby.stop, daemon=True).start()

    # -- requests from the HTTP layer (event loop thread) -------------------------------

    @property
    def protected(self) -> bool:
        """A standby is connected and mirroring (catching up counts: new blocks
        already reach it)."""
        return self.state.state in ("syncing", "in_sync")

    @property
    def refusing(self) -> bool:
        """``--mirror-required`` and unprotected: generation is refused, health fails."""
        return self.config.required and not self.protected

    def status(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self.state)
        out["protected"] = self.protected
        out["required"] = self.config.required
        out["paused"] = self._want_paused
        # What a failover would resubmit now.
        out["requests_in_flight"] = (self.failover.requests_in_flight
                                     if self.failover is not None else 0)
        return out

    async def verify(self) -> dict[str, Any]:
        """Every cached block of the primary: on the standby, same id, same bytes."""
        blocks = await self.engine_core.call_utility_async("mirror_checksums")
        standby = self.standby
        if standby is None or not standby.alive():
            raise RuntimeError("no standby engine is running")
        result = await self._standby_debug_call(standby, "mirror_standby_verify", blocks)
        result["state"] = self.state.state
        return result

    async def _standby_debug_call(self, standby: StandbyEngine, method: str, *args: Any
                                  ) -> Any:
        self._standby_debug_calls += 1
        try:
            return await standby.call(method, *args)
        finally:
            self._standby_debug_calls -= 1

    async def lookup(self, prompts: list[list[int]]) -> dict[str, list[int]]:
        """Prefix-cache hits (tokens) of each sequence on the primary and the standby."""
        primary = await self.engine_core.call_utility_async("mirror_lookup", prompts)
        standby = self.standby
        if standby is None or not standby.alive():
            raise RuntimeError("no standby engine is running")
        return {"primary": primary,
                "standby": await self._standby_debug_call(standby, "mirror_standby_lookup",
                                                          prompts)}

    async def refresh(self) -> dict[str, Any]:
        await asyncio.to_thread(self._try_poll)
        return self.status()

    def _try_poll(self) -> None:
        # A poll already running (the watch loop, another request) is as fresh as this
        # one would be; waiting behind a stuck standby would only pile up threads.
        if self._poll_lock.acquire(blocking=False):
            try:
                self._poll()
            finally:
                self._poll_lock.release()

    def shutdown(self) -> None:
        self._stop.set()
        if self.standby is not None:
            self.standby.stop()
        self._thread.join(timeout=15)
        if self.standby is not None:  # one the thread started meanwhile
            self.standby.stop()

