"""The long-running commands: `loramux serve` and `loramux http`, each until SIGINT/SIGTERM.

`run_server(config)` builds the engine (its model served as `config.served_model_name`, the
adapters of `config.adapters.modules` loaded as LoadAdapter loads them), starts it and, unless it
is disabled, the router that serves adapter "auto" (its saved tables at once; each adapter's
examples.jsonl and weights are reconciled on a background thread, while "auto" routes with what it
has, falling back to the base model while it knows no adapter), serves gRPC (and the OpenAI HTTP
shim when `config.http_port` is set) until a signal, then drains: new calls are refused, running
ones get `config.drain_timeout_s` to finish (a second signal aborts them), and the engine is
shut down. It also stops, with status 1, when the engine thread dies, so a supervisor can
restart the process. `cmd_http` serves only the HTTP shim in front of a running gRPC server.
Both return the exit status: 0 after a signal; 1 when the model or an adapter given at start
could not be loaded, the engine thread died or a port could not be bound. Both first raise the
soft open-file limit to the hard one (logged), so that the HTTP connection cap
(`config.http_limits`) leaves room for gRPC, and `configure_logging` rate-limits a flood of one
log line. `watch_engine` has the metrics read an engine (any process that serves one calls it).

torch, the engine, gRPC and the HTTP app are imported inside the functions that run them.
This module does not parse flags or turn them into a ServerConfig (`server/cli.py` does);
it does not know how the engine, the gRPC service or the HTTP app work inside (the residency
reader, `adapter_residency`, reads the adapter manager's slots and host cache through their public
methods).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import HttpLimits, ServerConfig
    from server.engine.adapters import AdapterManager
    from server.engine.engine import Engine
    from server.metrics import Metrics, ResidentAdapter
    from server.router.router import Router

logger = logging.getLogger("loramux")

SHUTDOWN_GRACE_S = 5.0
ENGINE_WATCH_S = 1.0


def configure_logging(level: str) -> None:
    """Log to stderr at `level` ("debug", "info", ...) with timestamps; a line repeated in a flood
    is rate-limited (`server.log_limits`)."""
    from server.log_limits import install

    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        install(handler)


def _raise_open_file_limit() -> None:
    """Lift the soft open-file limit to the hard one (HTTP connections are capped below it)."""
    from server.http.connections import raise_open_file_limit

    logger.info("open-file limit: %d", raise_open_file_limit())


# -- serve ---------------------------------------------------------------------------------


def run_server(config: ServerConfig) -> int:
    """Run engine, gRPC and (if configured) HTTP until SIGINT/SIGTERM or the engine dies."""
    from kernels.cpu_extension import CpuExtensionError
    from server.metrics import Metrics
    from server.runtime import build_engine, build_router

    metrics = Metrics(max_adapter_labels=config.metrics_max_adapters)
    try:
        engine = build_engine(config, metrics)
    # no such model, no CUDA, bad dtype, missing adapter root, --model-kernels fused that cannot build, ...
    except (OSError, ValueError, CpuExtensionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        serve_as(engine, config.served_model_name)
        load_modules(engine, config.adapters.modules)
        router = build_router(engine, config)
    # a refused --lora-modules adapter (AdapterError is a ValueError), --router-layer past the layers, ...
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        engine.shutdown()
        return 1
    watch_engine(metrics, engine)
    if router is not None:
        metrics.watch_router(router.routable_counts)
    _raise_open_file_limit()
    engine.start()
    reconciler = BackgroundReconciler(router) if router is not None else None
    try:
        return asyncio.run(_serve_until_signal(engine, router, config, metrics))
    except OSError as exc:  # the port is taken or the host is wrong
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if reconciler is not None:
            reconciler.stop()
        engine.shutdown()


def serve_as(engine: Engine, name: str | None) -> None:
    """Serve `engine`'s model under `name` (--served-model-name) in the APIs and the metrics; before
    anything reads the name (the router, the servers). None keeps its directory's name."""
    from dataclasses import replace

    if name:
        engine.info = replace(engine.info, model_name=name)


def load_modules(engine: Engine, modules: tuple[tuple[str, str], ...]) -> None:
    """Register the adapters given at start (--lora-modules), as LoadAdapter does; raises AdapterError
    (a ValueError) naming the one refused."""
    from adapters_store import AdapterError

    for name, directory in modules:
        assert engine.adapters is not None, "AdapterConfig refuses modules without slots"
        try:
            engine.adapters.load(name, directory)
        except AdapterError as exc:
            raise AdapterError(f"--lora-modules {name}={directory}: {exc}") from None
        logger.info("adapter %s loaded from %s", name, directory)


def count_refused_body(engine: Engine, model: str | None) -> None:
    """Count a generation request the HTTP shim refused itself (its body failed the schema) as the
    engine counts the refusals it sees: by the adapter `model` names (the base model, `auto`, an
    adapter, or `<unknown>` for anything else), outcome `invalid`."""
    from server.engine.events import UNKNOWN_ADAPTER
    from server.engine.request import InvalidRequest
    from server.preparation import AUTO_ADAPTER

    refusal = InvalidRequest("the request body failed the API's schema")
    if model == AUTO_ADAPTER:
        engine.record_refused((), refusal, AUTO_ADAPTER)
    elif model == engine.info.model_name:
        engine.record_refused((), refusal)
    elif model:
        engine.record_refused((model,), refusal)
    else:
        engine.record_refused((), refusal, UNKNOWN_ADAPTER)


def watch_engine(metrics: Metrics, engine: Engine) -> None:
    """Have `metrics` read `engine` at every scrape: its snapshot, the adapters it holds in memory
    and its model's name (call after `serve_as`)."""
    from functools import partial

    adapters = engine.adapters
    residency = partial(adapter_residency, adapters) if adapters is not None else None
    metrics.watch(engine.snapshot, residency, engine.info.model_name)


def adapter_residency(adapters: AdapterManager) -> list[ResidentAdapter]:
    """The adapters in memory, each once at its highest level: "gpu" in a current device slot (pinned
    while a running request holds it), else "cpu" in the host tier. Reads memory only: the slots and
    the host cache, never the roots, so it costs the same with 8 or 10,000 adapters on disk."""
    from server.metrics import ResidentAdapter

    on_device: dict[str, ResidentAdapter] = {}
    for slot in adapters.slots.slots():
        if slot.stale:  # unloaded or replaced: finishing its last requests, served to no new one
            continue
        held = on_device.get(slot.name)
        pinned = slot.pins > 0 or (held is not None and held.pinned)
        on_device[slot.name] = ResidentAdapter(slot.name, "gpu", pinned, slot.rank)
    resident = list(on_device.values())
    host = adapters.store.host
    for name in host.names():
        adapter = host.peek(name)  # None: evicted since the listing
        if name not in on_device and adapter is not None:
            resident.append(ResidentAdapter(name, "cpu", False, adapter.rank))
    return resident


class BackgroundReconciler:
    """Brings the router's tables in line with the adapters on a thread of its own (seconds to a
    minute); "auto" routes meanwhile with the tables it has. Then, every `rescan_s`, adapters added
    to or removed from the roots are learned or forgotten (a listing of the roots when nothing
    changed). The watching thread runs no torch; each reconcile runs its torch on one intra-op
    thread (server/engine/threads.py), on a thread that ends with it. `stop()` ends
    both before the server exits: a process that exits while a reconcile runs torch is aborted
    by the C++ runtime ("terminate called without an active exception")."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="loramux-router-follow", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop watching and wait (up to `timeout_s`) for a reconcile under way to return."""
        self._stop.set()
        self.router.stop()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("router: a reconcile is still running after %.0f s; exiting anyway", timeout_s)

    def _reconcile(self, names: set[str] | None) -> None:
        from server.engine.threads import one_intra_op_thread

        try:
            one_intra_op_thread()  # beside the engine's threads, never taking them (threads.py)
            self.router.reconcile(names)
        except Exception:
            logger.exception(
                "router: reconciling with the adapters failed; 'auto' routes with the tables it has"
            )

    def _run(self, names: set[str] | None) -> None:
        worker = threading.Thread(
            target=self._reconcile, args=(names,), name="loramux-router-reconcile", daemon=True
        )
        worker.start()
        worker.join()

    def _follow(self) -> None:
        started = time.monotonic()
        self._run(None)
        if self._stop.is_set():
            return
        logger.info(
            "router ready in %.1f s: %d adapters by examples, %d by weights only",
            time.monotonic() - started,
            *self.router.routable_counts(),
        )
        rescan_s = self.router.config.rescan_s
        while rescan_s > 0 and not self._stop.wait(rescan_s):
            try:
                changed = self.router.changed()
            except Exception:
                logger.exception("router: listing the adapter roots failed; retrying later")
                continue
            if changed:
                self._run(changed)


async def _serve_until_signal(
    engine: Engine, router: Router | None, config: ServerConfig, metrics: Metrics
) -> int:
    from server.auth import AuthConfig
    from server.grpc_server import serve_grpc

    auth = AuthConfig(
        api_key=config.api_key, admin_token=config.admin_token, enable_admin=config.enable_admin
    )
    # Before anything listens: a SIGTERM right after the "serving" line (a supervisor, a test) stops
    # the server cleanly instead of killing it while the HTTP shim still starts.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await serve_grpc(
        engine,
        config.host,
        config.grpc_port,
        auth=auth,
        request_timeout_s=config.request_timeout_s,
        router=router,
        router_events=metrics,
    )
    logger.info(
        "loramux serving %s on %s (router %s)",
        engine.info.model_name,
        server.address,
        "on: adapter 'auto' routes" if router is not None else "off",
    )
    http = None
    if config.http_port:
        from functools import partial

        from server.http.app import create_app
        from server.http.server import HttpServer

        app = create_app(
            _local_target(config.host, server.port),
            enable_admin=auth.admin_allowed,  # the same rule as gRPC's: --enable-admin or --admin-token
            metrics_registry=metrics.registry,
            api_key=config.api_key,
            admin_token=config.admin_token,
            limits=config.http_limits,
            on_refused=partial(count_refused_body, engine),
        )
        http = HttpServer(app, config.host, config.http_port, config.http_limits)
        try:
            await http.start()
        except BaseException:
            await server.stop(0)
            raise
    status = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=ENGINE_WATCH_S)
        except TimeoutError:
            if not engine.alive:  # let a supervisor restart us rather than serve errors
                logger.error("the engine thread died; shutting down")
                status = 1
                break
    grace = SHUTDOWN_GRACE_S
    if status == 0:  # drain: refuse new calls (UNAVAILABLE / 503), let running ones finish
        logger.info(
            "draining: running requests get up to %g s to finish (signal again to abort them)",
            config.drain_timeout_s,
        )
        hurry = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, hurry.set)
        drained = await server.drain(config.drain_timeout_s, give_up=hurry)
        if not drained:
            logger.warning("drain ended with requests still running; aborting them")
        grace = 0.0 if not drained else SHUTDOWN_GRACE_S
    logger.info("shutting down")
    stopping_http = asyncio.create_task(http.stop()) if http is not None else None
    await server.stop(grace)
    if stopping_http is not None:
        await stopping_http
    return status


def _local_target(host: str, port: int) -> str:
    """Where a client on this machine reaches a server listening on host:port."""
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# -- http ----------------------------------------------------------------------------------


def cmd_http(args: argparse.Namespace, limits: HttpLimits) -> int:
    """`loramux http`: the shim alone, in front of `args.grpc_target`, under `limits`."""
    _raise_open_file_limit()
    try:
        return asyncio.run(_serve_http_until_signal(args, limits))
    except OSError as exc:  # the port is taken or the host is wrong
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _serve_http_until_signal(args: argparse.Namespace, limits: HttpLimits) -> int:
    from server.http.app import create_app
    from server.http.server import HttpServer

    app = create_app(
        args.grpc_target,
        enable_admin=args.enable_admin,
        api_key=args.api_key,
        admin_token=args.admin_token,
        limits=limits,
    )
    http = HttpServer(app, args.host, args.port, limits)
    await http.start()
    logger.info("OpenAI API on http://%s:%d in front of gRPC %s", args.host, http.port, args.grpc_target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await http.stop()
    return 0
