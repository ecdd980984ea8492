"""The engine thread: one loop of `schedule -> forward -> sample -> postprocess` over all requests.

Callers on other threads (the async servers) talk to it only through `submit` and `abort`,
which put commands on a thread-safe inbox; results go back through each request's sink,
called on the engine thread. The engine knows nothing about gRPC or HTTP.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass

import torch

from adapters_store import AdapterError, AdapterNotFound, LoadedAdapter
from kernels import AdapterBatch
from server.config import EngineConfig
from server.engine.adapters import AdapterManager
from server.engine.detokenizer import Detokenizer
from server.engine.request import (
    EngineOverloaded,
    EngineUnavailable,
    FinishReason,
    GenerationRequest,
    InvalidRequest,
    RequestOutput,
)
from server.engine.sampling import Sampler
from server.engine.scheduler import Scheduler, Sequence, StepPlan
from server.metrics import UNKNOWN_ADAPTER, Metrics
from server.model.batch import DecodeSeq, StepBatch
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
class _Submit:
    seq: Sequence


@dataclass(frozen=True)
class _Abort:
    request_id: str


class _Stop:
    pass


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        adapters: AdapterManager | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.model = loaded.model
        self.adapters = adapters
        self.tokenizer = loaded.tokenizer
        self.eos_token_ids = loaded.eos_token_ids
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
        self.scheduler = Scheduler(config, self.kv)
        self._inbox: queue.Queue[_Submit | _Abort | _Stop] = queue.Queue()
        self._lock = threading.Lock()  # guards _live and _num_queued
        self._live: dict[str, Sequence] = {}
        self._num_queued = 0  # submitted, not yet in a KV slot
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: BaseException | None = None
        self.sampler = Sampler(torch.Generator().manual_seed(int(time.time_ns() % 2**63)))
        self._lora_state: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # (running, waiting) adapters
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.register_engine(self)
        if adapters is not None:
            adapters.observe_load = self.metrics.observe_adapter_load

    # ---- caller side (any thread) -------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="loramux-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still in flight are finished with CANCELLED."""
        self._stopping = True
        self._inbox.put(_Stop())
        if self._thread is not None:
            self._thread.join(timeout)
        if self.adapters is not None:
            self.adapters.shutdown()

    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request; raises InvalidRequest, AdapterError (unknown or malformed adapter),
        EngineOverloaded or EngineUnavailable at once."""
        try:
            self._enqueue(request, sink)
        except Exception as exc:
            self.record_refused(request.adapter, exc)
            raise

    def _enqueue(self, request: GenerationRequest, sink: Sink) -> None:
        self._validate(request)
        if not self.alive:
            reason = f": {self._failure!r}" if self._failure else ""
            raise EngineUnavailable(f"the engine is not running{reason}")
        seq = Sequence(
            request=request,
            sink=sink,
            generator=self._generator_for(request),
            detokenizer=Detokenizer(self.tokenizer, list(request.prompt_token_ids), request.sampling.stop),
            submitted_at=time.monotonic(),
        )
        with self._lock:
            if request.request_id in self._live:
                raise InvalidRequest(f"request id {request.request_id!r} is already running")
            if self._num_queued >= self.config.max_queue:
                raise EngineOverloaded(
                    f"the queue is full ({self.config.max_queue} requests waiting); retry later"
                )
            self._live[request.request_id] = seq
            self._num_queued += 1
        if request.adapter:  # start the disk -> host load now, beside whatever is running
            assert self.adapters is not None  # _validate checked it
            seq.adapter_future = self.adapters.prefetch(request.adapter)
        self._inbox.put(_Submit(seq))

    def abort(self, request_id: str) -> None:
        """Cancel a request; its sink gets a final CANCELLED output. Unknown ids are ignored."""
        self._inbox.put(_Abort(request_id))

    def check_adapter(self, name: str) -> None:
        """Raise AdapterNotFound (AdapterError if malformed) unless adapter `name` can be served."""
        if self.adapters is None:
            raise AdapterNotFound(
                f"adapter {name!r} is not loaded: this server serves no adapters (started with --max-slots 0)"
            )
        self.adapters.check_known(name)

    def lora_state(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(running, waiting) adapter names, sorted, as of the engine loop's last turn."""
        return self._lora_state

    def adapter_label(self, adapter: str) -> str:
        """The `adapter` label of a request's metrics: the adapter, or the base model's name."""
        return adapter or self.info.model_name

    def record_refused(self, adapter: str, exc: Exception) -> None:
        """Count a request refused before it reached the engine loop (here or by a server's checks)."""
        label = self.adapter_label(adapter)
        if adapter:
            try:
                self.check_adapter(adapter)
            except AdapterError:  # never a label per garbage name
                label = UNKNOWN_ADAPTER
        self.metrics.observe_refused(label, _refusal_outcome(exc))

    def stats(self) -> EngineStats:
        with self._lock:
            queued = self._num_queued
        used = self.scheduler.slots_used()
        return EngineStats(num_running=used, num_waiting=queued, kv_slots_used=used)

    def _validate(self, request: GenerationRequest) -> None:
        prompt = request.prompt_token_ids
        request.sampling.validate(self.info.vocab_size)
        if not prompt:
            raise InvalidRequest("the prompt is empty")
        if request.adapter:
            self.check_adapter(request.adapter)
        bad = next((t for t in prompt if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(
                f"prompt token id {bad} is outside the vocabulary [0, {self.info.vocab_size})"
            )
        total = len(prompt) + request.sampling.max_tokens
        if total > self.info.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
                f"exceeds the model's context of {self.info.max_model_len} tokens; shorten the prompt "
                "or lower max_tokens"
            )

    def _generator_for(self, request: GenerationRequest) -> torch.Generator | None:
        """A seeded request's own generator; None: it draws from the sampler's."""
        if request.sampling.seed is not None:
            return torch.Generator().manual_seed(request.sampling.seed)
        return None

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.scheduler.has_work)
                if self.scheduler.has_work and not self._stopping:
                    try:
                        self.step()
                    except Exception as exc:  # fail what was running, keep serving the rest
                        log.exception("engine step failed; failing the running requests")
                        for seq in list(self.scheduler.running):
                            self._finish(seq, FinishReason.ERROR, error=f"engine step failed: {exc!r}")
                if self.adapters is not None:
                    self._publish_lora_state()
        except BaseException as exc:  # the loop must never die silently
            log.exception("engine thread failed")
            self._failure = exc
            self._stopping = True
        finally:
            self._finish_all(FinishReason.ERROR if self._failure else FinishReason.CANCELLED)

    def _publish_lora_state(self) -> None:
        """Which adapters run and wait, for the scrape thread (one tuple swap per loop turn)."""
        running = sorted({s.request.adapter for s in self.scheduler.running if s.request.adapter})
        waiting = sorted({s.request.adapter for s in self.scheduler.waiting if s.request.adapter})
        self._lora_state = (tuple(running), tuple(waiting))

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if isinstance(command, _Submit):
                self.scheduler.add(command.seq)
            elif isinstance(command, _Abort):
                seq = self._live.get(command.request_id)
                if seq is not None:
                    self._finish(seq, FinishReason.CANCELLED)
            else:
                self._stopping = True
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                return

    def step(self) -> None:
        """One engine step: 1) plan, 2) forward, 3) sample, 4) stream and retire."""
        # 1) plan: admit into KV slots (and adapter slots), pick decode tokens and prefill chunks
        self._fail_unloadable_adapters()
        was_waiting = len(self.scheduler.waiting)
        plan = self.scheduler.schedule(self._ready)
        admitted = was_waiting - len(self.scheduler.waiting)
        if admitted:
            with self._lock:
                self._num_queued -= admitted
        if plan.empty:
            if self.scheduler.waiting and not self.scheduler.running:
                time.sleep(0.001)  # only waiting for adapter loads: do not spin
            return
        # 2) forward over the mixed batch
        batch = self._build_batch(plan)
        logits = self.model(batch, self.kv)
        for seq, chunk in plan.prefills:
            seq.num_cached += chunk
        for seq in plan.decodes:
            seq.num_cached += 1
        # 3) sample for every sequence that now has next-token logits
        sampled = plan.decodes + [s for s, _ in plan.prefills if s.prefilled]
        out = self.sampler.sample(
            logits, [s.request.sampling for s in sampled], [s.generator for s in sampled]
        )
        # 4) detokenize, stream, retire finished sequences (a row that could not be sampled fails alone)
        for row, (seq, token) in enumerate(zip(sampled, out.tokens, strict=True)):
            if row in out.errors:
                self._finish(seq, FinishReason.ERROR, error=out.errors[row])
            else:
                self._append(seq, token)

    def _ready(self, seq: Sequence) -> bool:
        """A waiting sequence may start once its adapter is in the host tier and pinned in a slot."""
        future = seq.adapter_future
        if future is None:
            return True
        if not future.done() or _load_error(future) is not None:
            return False
        assert self.adapters is not None
        slot = self.adapters.acquire(future.result())
        if slot is None:  # every device slot is pinned by running requests: wait for one
            return False
        seq.adapter_slot = slot
        return True

    def _fail_unloadable_adapters(self) -> None:
        for seq in list(self.scheduler.waiting):
            future = seq.adapter_future
            error = _load_error(future) if future is not None and future.done() else None
            if error is not None:
                self._finish(seq, FinishReason.ERROR, error=f"adapter {seq.request.adapter!r}: {error}")

    def _build_batch(self, plan: StepPlan) -> StepBatch:
        decodes = [DecodeSeq(s.slot, s.next_position, s.output_ids[-1]) for s in plan.decodes]
        prefills = [
            (
                s.slot,
                s.num_cached,
                list(s.request.prompt_token_ids[s.num_cached : s.num_cached + n]),
                s.num_cached + n == s.prompt_len,
            )
            for s, n in plan.prefills
        ]
        # Rows are decode tokens, then each prefill chunk: the adapter slot of every row.
        slot_ids = [s.adapter_slot for s in plan.decodes]
        for s, n in plan.prefills:
            slot_ids.extend([s.adapter_slot] * n)
        adapter_batch = None
        if any(slot >= 0 for slot in slot_ids):  # base-only steps skip the adapter term entirely
            adapter_batch = AdapterBatch.build(slot_ids, self.device)
        return StepBatch.build(decodes, prefills, self.device, adapter_batch)

    def _append(self, seq: Sequence, token: int) -> None:
        params = seq.request.sampling
        seq.output_ids.append(token)
        if len(seq.output_ids) == 1:
            seq.first_token_at = time.monotonic()
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if not is_eos:
            seq.detokenizer.add(token)
        reason = None
        if is_eos or token in params.stop_token_ids or seq.detokenizer.stopped:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_tokens or seq.num_cached + 1 >= self.info.max_model_len:
            reason = FinishReason.LENGTH
        if reason is None:
            self._emit(seq, seq.detokenizer.take(final=False), (token,))
        else:
            self._finish(seq, reason, (token,))

    def _emit(
        self,
        seq: Sequence,
        text: str,
        token_ids: tuple[int, ...],
        reason: FinishReason | None = None,
        error: str | None = None,
    ) -> None:
        output = RequestOutput(
            request_id=seq.request.request_id,
            text=text,
            token_ids=token_ids,
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=len(seq.output_ids),
            error=error,
        )
        try:
            seq.sink(output)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("sink of request %s failed; aborting it", seq.request.request_id)
            if reason is None:
                self.abort(seq.request.request_id)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        token_ids: tuple[int, ...] = (),
        error: str | None = None,
    ) -> None:
        with self._lock:
            if self._live.pop(seq.request.request_id, None) is None:
                return
            if seq.slot < 0:
                self._num_queued -= 1
        if seq.slot >= 0 or seq in self.scheduler.waiting:
            self.scheduler.release(seq)
        if seq.adapter_slot >= 0:
            assert self.adapters is not None
            self.adapters.release(seq.adapter_slot)
            seq.adapter_slot = -1
        self.metrics.observe_finished(
            self.adapter_label(seq.request.adapter),
            reason.value,
            min(seq.num_cached, seq.prompt_len),
            len(seq.output_ids),
            (seq.submitted_at, seq.first_token_at, time.monotonic()),
        )
        self._emit(seq, seq.detokenizer.take(final=True), token_ids, reason, error)

    def _finish_all(self, reason: FinishReason) -> None:
        while True:
            try:
                command = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Submit):
                self.scheduler.add(command.seq)
        error = repr(self._failure) if self._failure else None
        for seq in list(self._live.values()):
            self._finish(seq, reason, error=error)


def _refusal_outcome(exc: Exception) -> str:
    if isinstance(exc, EngineOverloaded):
        return "overloaded"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, InvalidRequest | AdapterError | NotImplementedError):
        return "invalid"  # the caller's fault (NotImplementedError: a feature not built yet)
    return "error"


def _load_error(future: Future[LoadedAdapter]) -> BaseException | None:
    """The error of a finished adapter load; a cancelled load counts as failed (never raises)."""
    if future.cancelled():
        return CancelledError("the adapter load was cancelled")
    return future.exception()
