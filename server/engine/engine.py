"""The engine thread: `schedule -> run -> postprocess`, step after step, over every request.

Callers on other threads (the async servers) talk to it only through `submit`, which queues a
prepared request and returns its handle, and `abort(handle)`, which puts a command on a
thread-safe inbox. Outputs go back through each request's sink, called on the engine thread;
finished and refused requests and adapter loads are reported to the `EngineEvents` it is given,
and `snapshot()` shows its state to whoever watches. While nothing can run (idle, or only
waiting for adapter loads) the thread sleeps on the inbox: submits and finished loads wake it.

The engine knows nothing about gRPC, HTTP or metrics, and checks nothing a preparation checked.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from adapters_store import AdapterError
from kernels.cpu_extension import take_intra_op_threads
from server.config import EngineConfig
from server.engine.adapters import AdapterManager
from server.engine.detokenizer import Detokenizer
from server.engine.events import UNKNOWN_ADAPTER, EngineEvents, EngineSnapshot, FinishedRequest, NoEvents
from server.engine.logits_processors import LogitsProcessor
from server.engine.logprobs import Logprobs, TokenTexts
from server.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    FinishReason,
    InvalidRequest,
    PreparedRequest,
    RequestHandle,
    RequestOutput,
)
from server.engine.runner import ModelRunner
from server.engine.sampling import Sampler
from server.engine.scheduler import Delivery, Scheduler
from server.engine.sequence import Sequence, Status
from server.engine.structured import GrammarCompiler
from server.engine.threads import ThreadGovernor
from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel

log = logging.getLogger(__name__)

Sink = Callable[[RequestOutput], None]


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    max_model_len: int
    max_running: int
    max_queue: int
    vocab_size: int
    device: str
    dtype: str
    kernels_backend: str


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_slots_used: int


@dataclass(frozen=True)
class _Abort:
    seq: Sequence


class _Wake:
    """Something may be able to run now (a submit, a finished adapter load)."""


class _Stop:
    pass


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        adapters: AdapterManager | None = None,
        events: EngineEvents | None = None,
    ) -> None:
        self.model = loaded.model
        self.adapters = adapters
        self.tokenizer = loaded.tokenizer  # for the servers' request preparation
        # The engine thread detokenizes with its own copy: a fast tokenizer used from two threads
        # at once can raise "Already borrowed".
        self._tokenizer = copy.deepcopy(loaded.tokenizer)
        self.eos_token_ids = loaded.eos_token_ids
        # Structured output's constraints, compiled by the servers' preparation (its thread, its tokenizer).
        self.grammars = GrammarCompiler(
            loaded.tokenizer, loaded.model.arch.vocab_size, frozenset(self.eos_token_ids)
        )
        arch = self.model.arch
        max_len = min(config.max_model_len, arch.max_position_embeddings)
        if arch.sliding_window:  # no sliding-window attention yet: stay inside the window
            max_len = min(max_len, arch.sliding_window)
        self.config = config
        self.device = self.model.embed_tokens.device
        self.info = EngineInfo(
            model_name=loaded.name,
            max_model_len=max_len,
            max_running=config.max_running,
            max_queue=config.max_queue,
            vocab_size=arch.vocab_size,
            device=str(self.device),
            dtype=str(self.model.dtype).removeprefix("torch."),
            kernels_backend=adapters.slots.backend.name if adapters else "none",
        )
        self.kv = KVCache(
            arch.num_layers,
            config.max_running,
            arch.num_kv_heads,
            arch.head_dim,
            max_len,
            self.model.dtype,
            self.device,
        )
        self.events: EngineEvents = events if events is not None else NoEvents()
        if adapters is not None:
            adapters.events = self.events
            adapters.wake = lambda: self._inbox.put(_Wake())
        self.scheduler = Scheduler(config, self.kv, max_len, frozenset(self.eos_token_ids), adapters)
        sampler = Sampler(torch.Generator().manual_seed(int(time.time_ns() % 2**63)))
        logprobs = Logprobs(TokenTexts(self._tokenizer))  # token texts on the engine thread only
        processor = LogitsProcessor(frozenset(self.eos_token_ids))
        self.runner = ModelRunner(
            self.model, self.kv, sampler, adapters, logprobs, logits_processor=processor
        )
        self._inbox: queue.Queue[_Abort | _Wake | _Stop] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self._lora_state: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # (running, waiting)
        # Set by server.runtime on CPU: fewer intra-op threads while other processes contend.
        self.governor: ThreadGovernor | None = None
        # The engine thread runs on the intra-op thread count of the thread that built the engine
        # (build_engine sets it from --threads); no other thread's count reaches it (threads.py).
        self._wanted_threads = torch.get_num_threads()
        self._threads = 0  # the engine thread's intra-op threads, read after every step (snapshots show it)
        self._took_threads = threading.Event()

    # ---- caller side (any thread) -------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()
        # Helper threads lower the process-wide count for themselves (threads.one_intra_op_thread):
        # the engine thread must have taken its own before the first request can start one.
        self._took_threads.wait()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight are finished with CANCELLED."""
        self._stopping = True
        self._inbox.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)
        if self.adapters is not None:
            self.adapters.shutdown()

    def submit(
        self,
        request: PreparedRequest,
        sink: Sink,
        adapter_tier: str | None = None,
        adapter_loads: tuple[Future[Any], ...] | None = None,
    ) -> RequestHandle:
        """Queue a prepared request; raises EngineOverloaded or EngineUnavailable at once.

        The handle it returns is what `abort` takes. Its outputs carry where its adapters were when it
        arrived (`RequestOutput.adapter_tier`): the `adapter_tier` given by a caller that looked
        before it started loads of its own (the gRPC service reads adapters into the host tier before
        it submits), else what `AdapterManager.tier` says as the request is accepted, before its
        loads start. `adapter_loads`: those loads (`AdapterManager.prefetch` of each of the request's
        adapter names, in order), so that no adapter is read and prepared twice for one request.
        """
        names = request.adapters.names
        if adapter_loads is not None and len(adapter_loads) != len(names):
            raise ValueError(f"{len(adapter_loads)} adapter loads given for {len(names)} adapters")
        try:
            if not self.alive:
                reason = f": {self._failure!r}" if self._failure else ""
                raise EngineUnavailable(f"the engine is not running{reason}")
            seq = self._sequence(request, sink)
            self.scheduler.add(seq, on_accept=lambda: self._start_loads(seq, adapter_tier, adapter_loads))
        except Exception as exc:
            self.record_refused(request.adapters.names, exc)
            raise
        self._inbox.put(_Wake())
        return seq

    def abort(self, handle: RequestHandle) -> None:
        """Cancel the submission `handle`; its sink gets a final CANCELLED output unless it has
        already finished (then nothing happens, whatever was submitted since with its id)."""
        assert isinstance(handle, Sequence)
        self._inbox.put(_Abort(handle))

    def adapter_label(self, adapter: str) -> str:
        """The `adapter` label of a request's metrics: the adapter(s), or the base model's name."""
        return adapter or self.info.model_name

    def record_refused(self, names: tuple[str, ...], exc: Exception, label: str | None = None) -> None:
        """Report a request for adapters `names` (() = base model) refused before it ran (here, or by
        the servers' preparation), under `label` if given (a request that named no adapter yet: the
        router's `auto`), else its adapters'. Reads memory only: callers may be on an event loop."""
        if label is None:
            adapters = self.adapters
            known = not names or (adapters is not None and all(adapters.is_listed(name) for name in names))
            label = (
                self.adapter_label("+".join(names)) if known else UNKNOWN_ADAPTER
            )  # no label per garbage name
        self.events.request_refused(label, _refusal_outcome(exc))

    def stats(self) -> EngineStats:
        running = self.scheduler.num_running
        return EngineStats(num_running=running, num_waiting=self.scheduler.num_waiting, kv_slots_used=running)

    def snapshot(self) -> EngineSnapshot:
        """The engine's state from memory only (cheap; any thread)."""
        running, waiting = self._lora_state
        return EngineSnapshot(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            kv_slots=self.kv.num_slots,
            kv_bytes=self.kv.nbytes(),
            running_adapters=running,
            waiting_adapters=waiting,
            adapters=self.adapters.snapshot() if self.adapters is not None else None,
            threads=self._threads,
        )

    def _sequence(self, request: PreparedRequest, sink: Sink) -> Sequence:
        seed = request.sampling.seed
        return Sequence(
            request=request,
            sink=sink,
            detokenizer=Detokenizer(self._tokenizer, list(request.prompt_token_ids), request.sampling.stop),
            generator=torch.Generator().manual_seed(seed) if seed is not None else None,
            submitted_at=time.monotonic(),
        )

    def _start_loads(
        self, seq: Sequence, adapter_tier: str | None, started: tuple[Future[Any], ...] | None
    ) -> None:
        """Note where an accepted request's adapters are (unless the caller saw it already), then
        start their loads (unless the caller `started` them); each one wakes the engine when done."""
        names = seq.request.adapters.names
        if not names:
            return
        assert self.adapters is not None, "preparation refuses adapters on a server without them"
        seq.adapter_tier = adapter_tier if adapter_tier is not None else self.adapters.tier(names)
        loads = started if started is not None else tuple(self.adapters.prefetch(name) for name in names)
        for load in loads:
            load.add_done_callback(lambda _: self._inbox.put(_Wake()))
        seq.adapter_loads = loads

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # ATen gives a thread the process-wide count on its first parallel call in each library
            # (torch, the fused kernels): take it in all now, then set this thread's own.
            take_intra_op_threads()
            torch.set_num_threads(self._wanted_threads)
            self._threads = torch.get_num_threads()
            self._took_threads.set()
            log.info("engine thread: %d intra-op threads", self._threads)
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.can_step)
                if self.scheduler.has_work and not self._stopping:
                    started = time.perf_counter()
                    self.step()
                    self.events.step_finished(time.perf_counter() - started)
                    if self.governor is not None:
                        self.governor.tick()
                    self._threads = torch.get_num_threads()  # what the next step runs on, as it is
                self._publish_lora_state()
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine thread failed")
            self._failure = exc
            self._stopping = True
        finally:
            self._took_threads.set()  # start() waits for it, also when taking the threads failed
            error = repr(self._failure) if self._failure else None
            reason = FinishReason.ERROR if self._failure else FinishReason.CANCELLED
            self._deliver(self.scheduler.close(reason, error))

    def step(self) -> None:
        """One engine step: admit and plan, run the model and sample, then stream and retire."""
        plan = self.scheduler.schedule()
        result = self.runner.run(plan)
        self._deliver(self.scheduler.postprocess(plan, result))

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get() if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(command, _Abort):
                self._deliver(self.scheduler.abort(command.seq))
            elif isinstance(command, _Stop):
                self._stopping = True
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _publish_lora_state(self) -> None:
        """Which adapters run and wait, for the scrape thread (one tuple swap per loop turn)."""
        running = sorted({n for s in self.scheduler.running for n in s.request.adapters.names})
        waiting = sorted({n for s in self.scheduler.waiting_sequences() for n in s.request.adapters.names})
        self._lora_state = (tuple(running), tuple(waiting))

    def _deliver(self, deliveries: list[Delivery]) -> None:
        for delivery in deliveries:
            seq, output = delivery.seq, delivery.output
            if output.finished:
                self._report_finished(seq, output)
            try:
                seq.sink(output)
            except Exception:  # a broken consumer must not take the engine down
                log.exception("sink of request %s failed; aborting it", seq.request.request_id)
                if seq.status is not Status.FINISHED:
                    self.abort(seq)

    def _report_finished(self, seq: Sequence, output: RequestOutput) -> None:
        assert output.finish_reason is not None
        self.events.request_finished(
            FinishedRequest(
                adapter=self.adapter_label(seq.request.adapters.label),
                outcome=output.finish_reason.value,
                prompt_tokens=min(seq.num_cached, seq.prompt_len),
                generated_tokens=len(seq.output_ids),
                submitted_at=seq.submitted_at,
                first_token_at=seq.first_token_at,
                finished_at=time.monotonic(),
                adapter_tier=seq.adapter_tier,
            )
        )


def _refusal_outcome(exc: Exception) -> str:
    if isinstance(exc, EngineOverloaded):
        return "overloaded"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, InvalidRequest | AdapterError | NotImplementedError):
        return "invalid"  # the caller's fault (NotImplementedError: a feature not built yet)
    return "error"
