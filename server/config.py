"""Server configuration as frozen dataclasses; `server/cli.py` is the only place that parses flags."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineConfig:
    """Limits of the continuous-batching engine.

    max_running: sequences decoded together (one KV slot each).
    max_queue: requests waiting for a slot; one more is refused (RESOURCE_EXHAUSTED).
    max_model_len: prompt + generated tokens of one sequence.
    max_batched_tokens: tokens in one engine step (decode tokens + prefill chunks).
    """

    max_running: int = 32
    max_queue: int = 256
    max_model_len: int = 2048
    max_batched_tokens: int = 512

    def __post_init__(self) -> None:
        for name in ("max_running", "max_queue", "max_model_len", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_batched_tokens < self.max_running:
            raise ValueError(
                f"max_batched_tokens ({self.max_batched_tokens}) must be >= max_running "
                f"({self.max_running}) so every running sequence can decode in one step"
            )


@dataclass(frozen=True)
class AdapterConfig:
    """The adapter tiers.

    roots: directories whose subdirectories are adapters named after them (loaded on first use).
    max_slots: adapters resident on the device at once (0 = serve no adapters). With the triton
        backend (CUDA), MoS and ComPEFT adapters get as many slots again each, in pools that keep
        their compact forms (server.runtime.slot_pools).
    max_rank: the largest LoRA rank accepted (device slots are sized by it).
    host_cache_mb: host memory for adapters read from disk (LRU by bytes).
    max_adapter_mb: the most one adapter's host form may occupy, checked from its file's header
        before its data is read; 0 = the whole host cache.
    pools: LoRA slot pools as (max_rank, slots) each, e.g. ((8, 24), (16, 8)): an adapter goes to the
        smallest max rank that fits; () = one pool of (max_rank, max_slots), as with no pools.
        Set programmatically (no CLI flag yet).
    modules: adapters registered at start under names of their own, as (name, directory) pairs
        (`--lora-modules NAME=PATH`, vLLM's flag), loaded as LoadAdapter loads them: a bad one stops
        the start. Each directory must lie inside one of `roots` (the flag adds its parent).
    """

    roots: tuple[str, ...] = ()
    max_slots: int = 8
    max_rank: int = 16
    host_cache_mb: int = 1024
    max_adapter_mb: int = 0
    pools: tuple[tuple[int, int], ...] = ()
    modules: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.max_slots < 0:
            raise ValueError(f"max_slots must be >= 0, got {self.max_slots}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank}")
        if self.host_cache_mb < 1:
            raise ValueError(f"host_cache_mb must be >= 1, got {self.host_cache_mb}")
        if self.max_adapter_mb < 0:
            raise ValueError(f"max_adapter_mb must be >= 0, got {self.max_adapter_mb}")
        for rank, slots in self.pools:
            if not 1 <= rank <= self.max_rank or slots < 1:
                raise ValueError(
                    f"each slot pool needs 1 <= max rank <= max_rank ({self.max_rank}) and >= 1 slot, "
                    f"got (rank {rank}, {slots} slots)"
                )
        names = [name for name, _ in self.modules]
        if names and self.max_slots == 0:
            raise ValueError("adapters given at start (--lora-modules) need adapter slots: max_slots >= 1")
        if len(set(names)) != len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"adapter names given twice at start (--lora-modules): {', '.join(twice)}")

    @property
    def pool_shapes(self) -> tuple[tuple[int, int], ...]:
        """(max_rank, slots) of each LoRA slot pool; () when adapters are off (max_slots 0)."""
        if self.max_slots == 0:
            return ()
        return self.pools or ((self.max_rank, self.max_slots),)


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP client may cost the OpenAI shim (`loramux serve` and `loramux http`).

    max_body_mb: largest request body, in MiB; a bigger one is answered 413 before it is parsed
        (at once when Content-Length says so, else as soon as the streamed body passes it).
    header_timeout_s: a connection whose request headers are not complete this long after its
        first byte (or after it opened) is answered 408 and closed.
    body_timeout_s: a request body not complete this long after its headers: 408 and closed.
    max_connections: open HTTP connections; beyond it the connection waiting longest for its
        headers is closed (408), or else the new one (503). The server lowers it further when the
        open-file limit would not leave room for gRPC (server.http.server.connection_cap).
    """

    max_body_mb: float = 4.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        for name in ("max_body_mb", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {self.max_connections}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


@dataclass(frozen=True)
class RouterConfig:
    """The router that serves `auto` (server/router/router.py).

    layer: the decoder layer whose input the selector reads (features.py).
    threshold: the least calibrated score `auto` serves an adapter at; below it, the base model.
    domain_factor: a prompt is out of domain past this many times the in-domain limit (selector.py).
    top_k: adapters an `auto` request mixes by default (a request may ask for more).
    prototype_layers: layers whose projections the weight-only prototypes cover (0 = all).
    arrow_temperature: the softmax temperature of weight-only (standardized) scores.
    adapters: fnmatch patterns of the adapters `auto` may pick; "!pattern" excludes.
    state_path: where the tables are saved (a .safetensors path), None = not saved.
    enabled: False = no router (`auto` is refused).
    steps: training steps per learned adapter (server.router.selector).
    rescan_s: how often `serve` looks for adapters added to or removed from the roots (0 = never).
    """

    layer: int = 2  # server.router.features.DEFAULT_LAYER
    threshold: float = 0.5
    domain_factor: float = 1.5
    top_k: int = 1
    prototype_layers: int = 0
    arrow_temperature: float = 0.5
    adapters: tuple[str, ...] = ("*",)
    state_path: str | None = None
    enabled: bool = True
    steps: int = 300  # server.router.selector.STEPS
    rescan_s: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"router threshold must be in [0, 1], got {self.threshold}")
        if self.top_k < 1:
            raise ValueError(f"router top_k must be >= 1, got {self.top_k}")
        if self.arrow_temperature <= 0:
            raise ValueError(f"arrow temperature must be > 0, got {self.arrow_temperature}")
        if self.layer < 0 or self.prototype_layers < 0 or self.steps < 1 or self.domain_factor <= 0:
            raise ValueError("router layer and prototype_layers must be >= 0, steps >= 1, domain_factor > 0")
        if not self.rescan_s >= 0:
            raise ValueError(f"router rescan must be >= 0 seconds, got {self.rescan_s}")

    def allows(self, name: str) -> bool:
        include = [p for p in self.adapters if not p.startswith("!")]
        exclude = [p[1:] for p in self.adapters if p.startswith("!")]
        return any(fnmatch.fnmatchcase(name, p) for p in include) and not any(
            fnmatch.fnmatchcase(name, p) for p in exclude
        )


MODEL_KERNELS = ("auto", "fused", "torch")  # kernels.model_ops.KERNEL_CHOICES, without importing torch


@dataclass(frozen=True)
class ServerConfig:
    """Everything `loramux serve` needs. `model=None` means the embedded SmolLM2-135M-Instruct."""

    model: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    model_kernels: str = (
        "auto"  # non-GEMM ops: auto (fused C++ for fp32 on CPU when it builds) | fused | torch
    )
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int = 8000  # the OpenAI-compatible HTTP shim; 0 = no HTTP
    # Loading / unloading adapters and example prompts, over gRPC and HTTP (an admin_token enables
    # them too, for whoever presents it).
    enable_admin: bool = False
    http_limits: HttpLimits = field(default_factory=HttpLimits)
    cache_dir: str | None = None  # default: $LORAMUX_CACHE or ~/.cache/loramux
    # Secrets: never in repr (so never in a logged config). None = not required.
    api_key: str | None = field(default=None, repr=False)  # every Inference call / /v1 route
    admin_token: str | None = field(default=None, repr=False)  # LoadAdapter / UnloadAdapter
    request_timeout_s: float = 600.0  # a generation running longer is aborted; 0 = no limit
    drain_timeout_s: float = 30.0  # on SIGTERM, how long running requests may finish
    threads: int | None = None  # the engine's intra-op (OpenMP) threads; None = server.cpus.usable_cpus()
    served_model_name: str | None = None  # the model's id in the APIs and metrics; None = its directory's
    # Adapter labels with Prometheus series of their own; later ones are counted as "<other>".
    metrics_max_adapters: int = 256
    engine: EngineConfig = field(default_factory=EngineConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.metrics_max_adapters < 0:
            raise ValueError(f"metrics_max_adapters must be >= 0, got {self.metrics_max_adapters}")
