"""The `loramux` command line; the only module that parses flags.

    loramux serve     run the server (engine + gRPC + OpenAI HTTP shim) until SIGINT/SIGTERM
    loramux http      run only the OpenAI HTTP shim in front of a running gRPC server
    loramux ray       run replicas of the server on Ray Serve, with adapter affinity (extra `ray`)
    loramux generate  stream one completion from a running server; prints only the text
    loramux info      print a running server's GetInfo as JSON
    loramux adapters list | load NAME PATH | unload NAME | examples NAME FILE
                      manage a running server's adapters (and the example prompts it routes them by)
    loramux route     ask a running server's router which adapters it would pick for a prompt
    loramux train     train a PEFT LoRA adapter on the base model from a JSONL file (CPU)
    loramux compress  compress a PEFT LoRA adapter (ComPEFT) and report its fidelity
    loramux export    write an adapter of any format as a PEFT LoRA directory
    loramux eval      score a running server (base and/or an adapter) on a demo task's held-out set
    loramux bench engine|adapters|attack|...   benchmarks (flags belong to bench.<name>_bench)

Parsers are built here and only here, and flags become a `ServerConfig` (`server_config`)
here. The handlers live elsewhere: the client commands (generate, info, adapters) in
`server.client_commands`, the long-running ones (serve, http) in `server.serve_commands`;
the benchmarks are `bench.<name>_bench`, imported only when run. Heavy imports (torch, the
engine, grpc, the benchmark) happen inside the handler that needs them, so client commands
start fast. This module does not know how the engine, the service or a gRPC call work.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from server.cli_support import DEFAULT_GRPC_PORT, exit_quietly_on_broken_pipe, grpc_target, package_version
from server.client_commands import (
    cmd_adapters_examples,
    cmd_adapters_list,
    cmd_adapters_load,
    cmd_adapters_unload,
    cmd_generate,
    cmd_info,
    cmd_route,
)
from server.config import MODEL_KERNELS, AdapterConfig, EngineConfig, HttpLimits, RouterConfig, ServerConfig
from server.serve_commands import cmd_http, configure_logging, run_server

if TYPE_CHECKING:
    from server.ray_serve.settings import RayConfig

MAX_ROUTE_TOP_K = 8  # server.preparation.MAX_MIXTURE (not imported: it brings torch)
API_KEY_ENV = "LORAMUX_API_KEY"
ADMIN_TOKEN_ENV = "LORAMUX_ADMIN_TOKEN"
Handler = Callable[[argparse.Namespace, list[str]], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: `bench engine` hands its flags on to the benchmark's own parser.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return exit_quietly_on_broken_pipe(lambda: handler(args, extra))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-adapter LLM inference server.")
    parser.add_argument("--version", action="version", version=f"loramux {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_generate(commands)
    _add_http(commands)
    _add_info(commands)
    _add_adapters(commands)
    _add_route(commands)
    _add_eval(commands)
    _add_bench(commands)
    _add_train(commands)
    _add_compress(commands)
    _add_export(commands)
    _add_ray(commands)
    return parser


# -- serve ---------------------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server, engine, adapters = ServerConfig(), EngineConfig(), AdapterConfig()  # defaults = flag defaults
    serve = commands.add_parser("serve", help="run the server until SIGINT/SIGTERM")
    serve.add_argument(
        "--model",
        default=server.model,
        help="checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct)",
    )
    serve.add_argument("--host", default=server.host, help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--grpc-port",
        type=_port,
        default=server.grpc_port,
        help="gRPC port, 0 = any free (default: %(default)s)",
    )
    serve.add_argument(
        "--http-port",
        "--port",
        type=_port,
        default=server.http_port,
        action=_OneSetting,
        help="OpenAI-compatible HTTP port (/metrics too); 0 = no HTTP (default: %(default)s)",
    )
    serve.add_argument(
        "--enable-admin",
        action="store_true",
        help="allow changing adapters at run time, over gRPC (LoadAdapter, UnloadAdapter, "
        "RegisterExamples) and HTTP (/v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/router/examples); "
        "an --admin-token allows them too, to whoever presents it",
    )
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=server.device)
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=server.dtype)
    serve.add_argument(
        "--model-kernels",
        choices=list(MODEL_KERNELS),
        default=server.model_kernels,
        help="the model's non-GEMM ops (norms, rotary, decode attention, SwiGLU): 'fused' C++ kernels "
        "for fp32 on CPU (built once into the cache), 'torch' ops, or 'auto' (fused when they build)",
    )
    serve.add_argument(
        "--max-running",
        "--max-num-seqs",
        type=int,
        default=engine.max_running,
        action=_OneSetting,
        help="sequences decoded together (default: %(default)s)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=engine.max_queue,
        help="requests waiting for a slot (default: %(default)s)",
    )
    serve.add_argument(
        "--max-model-len",
        type=int,
        default=engine.max_model_len,
        help="prompt + generated tokens (default: %(default)s)",
    )
    serve.add_argument(
        "--max-batched-tokens",
        "--max-num-batched-tokens",
        type=int,
        default=engine.max_batched_tokens,
        action=_OneSetting,
        help="tokens per engine step (default: %(default)s)",
    )
    serve.add_argument(
        "--cache-dir",
        default=server.cache_dir,
        help="converted-model cache (default: $LORAMUX_CACHE or ~/.cache/loramux)",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory whose subdirectories are adapters named after them; LoadAdapter paths must lie "
        "inside one (repeatable; earlier roots win a name)",
    )
    serve.add_argument(
        "--max-slots",
        "--max-loras",
        type=_non_negative,
        default=adapters.max_slots,
        action=_OneSetting,
        help="adapters resident on the device at once; 0 = serve no adapters (default: %(default)s)",
    )
    serve.add_argument(
        "--max-rank",
        "--max-lora-rank",
        type=int,
        default=adapters.max_rank,
        action=_OneSetting,
        help="largest LoRA rank accepted; sizes the device slots (default: %(default)s)",
    )
    serve.add_argument(
        "--host-cache-mb",
        type=int,
        default=adapters.host_cache_mb,
        help="host memory for adapters read from disk, LRU (default: %(default)s)",
    )
    serve.add_argument(
        "--max-adapter-mb",
        type=_non_negative,
        default=adapters.max_adapter_mb,
        help="the most one adapter may occupy in host memory, checked before its data is read; "
        "0 = the whole host cache (default: %(default)s)",
    )
    serve.add_argument(
        "--metrics-max-adapters",
        type=_non_negative,
        default=server.metrics_max_adapters,
        help="adapter labels (a mixture's a+b is one) with Prometheus series of their own; requests "
        'of later ones are counted under adapter="<other>" (each label is about 80 series); '
        "0 = none (default: %(default)s)",
    )
    serve.add_argument(
        "--request-timeout",
        type=_non_negative_float,
        default=server.request_timeout_s,
        help="abort a generation running longer, in seconds; 0 = no limit (default: %(default)s)",
    )
    serve.add_argument(
        "--drain-timeout",
        type=_non_negative_float,
        default=server.drain_timeout_s,
        help="on SIGTERM/SIGINT, seconds running requests get to finish (default: %(default)s)",
    )
    serve.add_argument(
        "--threads",
        type=_positive,
        default=server.threads,
        help="the engine's intra-op threads (default: the CPUs this process may use, capped by its "
        "cgroup CPU quota; see README 'Serving' beside other busy processes)",
    )
    _add_vllm_compatibility(serve)
    _add_router(serve)
    _add_http_limits(serve)
    _add_secrets(serve, admin=True)
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(handler=_cmd_serve)


def _add_vllm_compatibility(parser: argparse.ArgumentParser) -> None:
    """vLLM's launch flags, so that tools that launch `vllm serve` (KServe, llm-d) launch loramux.

    Those with a loramux equivalent are spellings of its flag (--port = --http-port, --max-loras =
    --max-slots, --max-lora-rank = --max-rank, --max-num-seqs = --max-running,
    --max-num-batched-tokens = --max-batched-tokens), with loramux's defaults; two spellings given
    different values are an error (`_OneSetting`). The ones below have no loramux equivalent.
    """
    group = parser.add_argument_group(
        "vLLM compatibility",
        "vLLM's launch flags: --port, --max-loras, --max-lora-rank, --max-num-seqs and "
        "--max-num-batched-tokens are other spellings of loramux's flags above (loramux's defaults).",
    )
    group.add_argument(
        "model_path",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="as --model (vLLM's `vllm serve MODEL`)",
    )
    group.add_argument(
        "--lora-modules",
        nargs="+",
        action="extend",
        type=_lora_module,
        default=[],
        metavar="NAME=PATH",
        help="adapters to serve under names of their own, loaded at start (a bad one stops the start): "
        'NAME=PATH or a JSON object {"name": ..., "path": ...} (its "base_model_name" is accepted and '
        "not used: loramux has one base model). loramux reads adapters only from adapter roots, so the "
        "directory holding each PATH becomes an adapter root too (unless an --adapter-root holds it): "
        "the adapters beside it are served under their directory names",
    )
    group.add_argument(
        "--enable-lora",
        action="store_true",
        help="accepted and not needed: loramux always serves adapters (unless --max-slots 0)",
    )
    group.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the base model's id in the OpenAI API, the gRPC API and the metrics (one name; default: "
        "its directory's name)",
    )


class _OneSetting(argparse.Action):
    """`store` for a setting with several spellings (loramux's flag and vLLM's): one spelling given
    twice keeps the last value, as usual; two spellings given different values are an error."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        given: dict[str, tuple[str | None, object]] = namespace.__dict__.setdefault("_spellings", {})
        previous = given.get(self.dest)
        if previous is not None and previous[0] != option_string and previous[1] != values:
            parser.error(
                f"{previous[0]} {previous[1]} and {option_string} {values} set the same thing to different "
                "values; give one of them"
            )
        given[self.dest] = (option_string, values)
        setattr(namespace, self.dest, values)


def _lora_module(text: str) -> tuple[str, str]:
    """vLLM's --lora-modules item: NAME=PATH or {"name": ..., "path": ..., "base_model_name": ...}
    -> (name, the real directory). The name is checked where the adapter is loaded."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object ({exc.msg}): {text}") from None
        unknown = set(item) - {"name", "path", "base_model_name"} if isinstance(item, dict) else set()
        if not isinstance(item, dict) or unknown:
            raise argparse.ArgumentTypeError(
                f'expected {{"name": ..., "path": ...}} (and optionally "base_model_name"), got {text}'
            )
        name, path = item.get("name"), item.get("path")
    else:
        name, _, path = text.partition("=")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise argparse.ArgumentTypeError(f'expected NAME=PATH or {{"name": ..., "path": ...}}, got {text}')
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(
            f"{name}={path}: not a directory; loramux serves adapters from local directories only "
            "(download it first)"
        )
    return name, os.path.realpath(path)


def _module_roots(roots: Sequence[str], modules: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """`roots`, then the directory holding each module that no root holds (loramux reads adapters
    only from inside adapter roots)."""
    real = [os.path.realpath(root) for root in roots]
    added: list[str] = []
    for _, directory in modules:
        parent = os.path.dirname(directory)
        inside = any(os.path.commonpath([root, directory]) == root != directory for root in real)
        if not inside and parent not in added:
            added.append(parent)
    return (*roots, *added)


def _add_router(parser: argparse.ArgumentParser) -> None:
    router = RouterConfig()
    group = parser.add_argument_group(
        "router (adapter 'auto')",
        "Requests for adapter 'auto' (OpenAI model 'auto') get the adapter(s) whose example prompts "
        "(an adapter's examples.jsonl, RegisterExamples) or, lacking any, whose weights fit the prompt "
        "best; the base model when none fits well.",
    )
    group.add_argument(
        "--no-router",
        dest="router",
        action="store_false",
        help="no router: adapter 'auto', Route and example prompts are refused",
    )
    group.add_argument(
        "--router-adapters",
        type=_patterns,
        default=router.adapters,
        metavar="PATTERNS",
        help="comma-separated fnmatch patterns of the adapters 'auto' may pick; '!pattern' excludes, "
        "e.g. 'sql-*,!sql-old' (default: all)",
    )
    group.add_argument(
        "--router-threshold",
        type=float,
        default=router.threshold,
        help="the least score, in [0, 1], at which 'auto' serves an adapter; below it, the base model "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--router-top-k",
        type=_route_top_k,
        default=router.top_k,
        help=f"adapters an 'auto' request mixes unless it sets route_top_k, 1-{MAX_ROUTE_TOP_K} "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--router-layer",
        type=_non_negative,
        default=router.layer,
        help="the decoder layer whose input the router reads; changing it relearns every adapter's "
        "examples at start (default: %(default)s)",
    )
    group.add_argument(
        "--router-rescan",
        type=float,
        default=router.rescan_s,
        metavar="SECONDS",
        help="how often the router looks for adapters added to or removed from the roots; 0 = only "
        "at start (default: %(default)s)",
    )


def _add_http_limits(parser: argparse.ArgumentParser) -> None:
    limits = HttpLimits()
    parser.add_argument(
        "--http-max-body-mb",
        type=float,
        default=limits.max_body_mb,
        help="largest HTTP request body in MiB; larger ones are answered 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--http-header-timeout",
        type=float,
        default=limits.header_timeout_s,
        help="seconds a connection may take to send its request headers, else 408 and closed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--http-body-timeout",
        type=float,
        default=limits.body_timeout_s,
        help="seconds a request may take to send its body after the headers, else 408 and closed "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--http-max-connections",
        type=int,
        default=limits.max_connections,
        help="open HTTP connections; lowered to leave room for gRPC under the open-file limit "
        "(default: %(default)s)",
    )


def http_limits(args: argparse.Namespace) -> HttpLimits:
    """The HttpLimits the --http-* flags describe; raises ValueError on bad values."""
    return HttpLimits(
        max_body_mb=args.http_max_body_mb,
        header_timeout_s=args.http_header_timeout,
        body_timeout_s=args.http_body_timeout,
        max_connections=args.http_max_connections,
    )


def _add_secrets(parser: argparse.ArgumentParser, *, admin: bool) -> None:
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"API key (Authorization: Bearer); default: ${API_KEY_ENV}, which keeps it out of `ps`",
    )
    if admin:
        parser.add_argument(
            "--admin-token",
            default=os.environ.get(ADMIN_TOKEN_ENV) or None,
            help=f"token that loading/unloading adapters needs; default: ${ADMIN_TOKEN_ENV}",
        )


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


UINT32_MAX = 2**32 - 1  # a uint32 field of the gRPC API


def _token_count(text: str) -> int:
    value = _non_negative(text)
    if value > UINT32_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {UINT32_MAX} (the API's limit), got {value}")
    return value


def _patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(part.strip() for part in text.split(",") if part.strip())
    if not patterns or all(p.startswith("!") for p in patterns):
        raise argparse.ArgumentTypeError(
            f"give at least one pattern of adapters to include (e.g. '*,!old-*'), got {text!r}"
        )
    return patterns


def _route_top_k(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_ROUTE_TOP_K:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_ROUTE_TOP_K}, got {value}")
    return value


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {port}")
    return port


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig that `loramux serve` flags describe; raises ValueError on bad limits."""
    engine = EngineConfig(
        max_running=args.max_running,
        max_queue=args.max_queue,
        max_model_len=args.max_model_len,
        max_batched_tokens=args.max_batched_tokens,
    )
    if args.enable_lora and args.max_slots == 0:
        raise ValueError("--enable-lora asks for adapters, but --max-slots 0 serves none")
    adapters = AdapterConfig(
        roots=_module_roots(args.adapter_root, args.lora_modules),
        modules=tuple(args.lora_modules),
        max_slots=args.max_slots,
        max_rank=args.max_rank,
        host_cache_mb=args.host_cache_mb,
        max_adapter_mb=args.max_adapter_mb,
    )
    router = RouterConfig(
        enabled=args.router,
        adapters=args.router_adapters,
        threshold=args.router_threshold,
        top_k=args.router_top_k,
        layer=args.router_layer,
        rescan_s=args.router_rescan,
    )
    if args.model is not None and args.model_path is not None and args.model != args.model_path:
        raise ValueError(f"two models given: --model {args.model} and MODEL {args.model_path}; give one")
    names = args.served_model_name or [None]
    if len(names) > 1:
        raise ValueError(
            f"--served-model-name: loramux serves its model under one name, got {' '.join(names)}"
        )
    return ServerConfig(
        model=args.model or args.model_path,
        served_model_name=names[0],
        device=args.device,
        dtype=args.dtype,
        model_kernels=args.model_kernels,
        host=args.host,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        enable_admin=args.enable_admin,
        http_limits=http_limits(args),
        cache_dir=args.cache_dir,
        api_key=args.api_key,
        admin_token=args.admin_token,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        metrics_max_adapters=args.metrics_max_adapters,
        threads=args.threads,
        engine=engine,
        adapters=adapters,
        router=router,
    )


def _cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    """Flags to a ServerConfig (2 when they describe bad limits); `run_server` runs it."""
    configure_logging(args.log_level)
    try:
        config = server_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return run_server(config)


# -- http ----------------------------------------------------------------------------------


def _add_http(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    http = commands.add_parser(
        "http",
        help="run only the OpenAI-compatible HTTP shim, in front of a running gRPC server",
        description="Serves the OpenAI API (/v1/models, /v1/completions, /v1/chat/completions, /health) "
        "by calling the loramux gRPC server at --grpc-target.",
    )
    http.add_argument(
        "--grpc-target",
        type=grpc_target,
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
        help=f"gRPC server HOST[:PORT], port {DEFAULT_GRPC_PORT} when left out (default: %(default)s)",
    )
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    http.add_argument("--port", type=_port, default=8000, help="HTTP port (default: %(default)s)")
    http.add_argument(
        "--enable-admin",
        action="store_true",
        help="allow changing adapters over HTTP (/v1/load_lora_adapter, /v1/unload_lora_adapter, "
        "/v1/router/examples)",
    )
    _add_http_limits(http)
    _add_secrets(http, admin=True)
    http.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    http.set_defaults(handler=_cmd_http)


def _cmd_http(args: argparse.Namespace, extra: list[str]) -> int:
    """The --http-* flags to HttpLimits (2 when they are bad); `cmd_http` serves."""
    configure_logging(args.log_level)
    try:
        limits = http_limits(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return cmd_http(args, limits)


# -- ray -----------------------------------------------------------------------------------


def _add_ray(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.ray_serve.settings import RayConfig  # no ray import: the handler checks it is there

    default = RayConfig()
    ray = commands.add_parser(
        "ray",
        parents=[_serve_flags()],  # `loramux serve`'s flags, the same set whatever it grows
        conflict_handler="resolve",  # the inherited -h/--help
        allow_abbrev=False,  # `serve run` arguments name flags whole: max_slot is not max_slots
        help="run replicas of the server on Ray Serve, with adapter affinity (needs the `ray` extra)",
        description="Deploys --replicas loramux servers (each one engine, in-process) behind an "
        "OpenAI ingress on Ray Serve, whose router sends a request to a replica that already holds "
        "its adapter. Starts a local Ray instance, or joins --address. Takes `loramux serve`'s "
        "flags: --host and --http-port are Ray's HTTP proxy's; --grpc-port and the HTTP connection "
        "limits are not used (each replica's gRPC server listens on a free loopback port, Ray's "
        "proxy holds the connections) and --enable-admin is refused (adapters come from the "
        "adapter roots every replica reads). Needs `pip install -e '.[ray]'`.",
    )
    group = ray.add_argument_group("Ray Serve")
    group.add_argument(
        "--replicas", type=_positive, default=default.replicas, help="engine replicas (default: %(default)s)"
    )
    group.add_argument(
        "--address",
        default=default.address,
        help="the Ray cluster to deploy on: 'auto' (the one this machine belongs to), HOST:PORT or "
        "ray://HOST:10001 (default: start a local Ray instance)",
    )
    group.add_argument(
        "--replica-cpus",
        type=_non_negative_float,
        default=default.replica_cpus,
        help="CPUs Ray reserves for each replica; its torch threads unless --threads (default: %(default)s)",
    )
    group.add_argument(
        "--replica-gpus",
        type=_non_negative_float,
        default=default.replica_gpus,
        help="GPUs Ray reserves for each replica; 0 runs them on CPUs (default: %(default)s)",
    )
    group.add_argument(
        "--max-ongoing",
        type=_positive,
        default=default.max_ongoing,
        help="requests Ray hands one replica at once before it spills over to another "
        "(default: --max-running)",
    )
    group.add_argument(
        "--app-name", default=default.app_name, help="the Serve application (default: %(default)s)"
    )
    ray.set_defaults(handler=_cmd_ray)


def _serve_flags() -> argparse.ArgumentParser:
    """A parser holding exactly `loramux serve`'s flags, for commands that take them too."""
    holder = argparse.ArgumentParser(add_help=False).add_subparsers()
    _add_serve(holder)
    return holder.choices["serve"]


def ray_settings(argv: Sequence[str]) -> tuple[ServerConfig, RayConfig]:
    """The settings `loramux ray ARGV` describes; raises ValueError on bad or unknown flags.
    (`serve run`'s application arguments come here as flags: server/ray_serve/settings.py.)"""
    try:
        args, unknown = build_parser().parse_known_args(["ray", *argv])
    except SystemExit:  # argparse has printed what was wrong
        raise ValueError(f"bad loramux application arguments: {' '.join(argv)}") from None
    if unknown:
        raise ValueError(f"unknown loramux application arguments: {' '.join(unknown)}")
    return _ray_settings(args)


def _ray_settings(args: argparse.Namespace) -> tuple[ServerConfig, RayConfig]:
    from server.ray_serve.settings import RayConfig

    ray_config = RayConfig(
        replicas=args.replicas,
        replica_cpus=args.replica_cpus,
        replica_gpus=args.replica_gpus,
        max_ongoing=args.max_ongoing,
        address=args.address,
        app_name=args.app_name,
    )
    return server_config(args), ray_config


def _cmd_ray(args: argparse.Namespace, extra: list[str]) -> int:
    """Flags to a ServerConfig and RayConfig (2 when they are bad); `cmd_ray` deploys them."""
    from server.ray_serve.launch import cmd_ray

    configure_logging(args.log_level)
    try:
        config, ray_config = _ray_settings(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return cmd_ray(config, ray_config)


# -- generate ------------------------------------------------------------------------------


def _add_generate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    generate = commands.add_parser(
        "generate",
        help="stream one completion from a running server",
        description="Streams a completion and prints only the generated text. Greedy (temperature 0) "
        "unless --temperature is given. The prompt is sent as one user chat message (the server "
        "applies the chat template) unless --raw is given.",
    )
    _add_target(generate)
    _add_prompt(generate)
    generate.add_argument(
        "--max-tokens", type=_token_count, default=None, help="most tokens to generate (server default: 64)"
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=_non_negative, default=0, help="0 = off")
    generate.add_argument("--seed", type=_non_negative, default=None)
    generate.add_argument("--stop", nargs="+", default=[], metavar="S", help="stop strings")
    generate.add_argument(
        "--adapter",
        default="",
        help="adapter name (see `loramux adapters list`); '' = base model; 'auto' = the router picks",
    )
    generate.add_argument(
        "--route-top-k",
        type=_route_top_k,
        default=None,
        help=f"with --adapter auto: mix the router's best N adapters, 1-{MAX_ROUTE_TOP_K} (default: the server's)",
    )
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    generate.set_defaults(handler=cmd_generate)


def _add_prompt(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument(
        "--raw", action="store_true", help="send the prompt as plain text, without the chat template"
    )


def _add_route(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    route = commands.add_parser(
        "route",
        help="print which adapters a running server's router would pick for a prompt (JSON)",
        description="Asks the Route RPC and prints its answer as JSON: the candidates best first with "
        "their scores, and whether adapter 'auto' would fall back to the base model (and why). The "
        "prompt is sent as one user chat message unless --raw is given, as `loramux generate` does.",
    )
    _add_target(route)
    _add_prompt(route)
    route.add_argument(
        "--top-k", type=_non_negative, default=0, help="candidates to print; 0 = all (default)"
    )
    route.add_argument(
        "--timeout", type=float, default=60.0, help="deadline in seconds (default: %(default)s)"
    )
    route.set_defaults(handler=cmd_route)


def _add_target(parser: argparse.ArgumentParser, *, admin: bool = False) -> None:
    parser.add_argument(
        "--target",
        type=grpc_target,
        default=f"127.0.0.1:{DEFAULT_GRPC_PORT}",
        help=f"server address HOST[:PORT], port {DEFAULT_GRPC_PORT} when left out (default: %(default)s)",
    )
    _add_secrets(parser, admin=admin)


# -- info ----------------------------------------------------------------------------------


def _add_info(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = commands.add_parser("info", help="print a running server's GetInfo as JSON")
    _add_target(info)
    info.add_argument(
        "--timeout", type=float, default=10.0, help="deadline in seconds (default: %(default)s)"
    )
    info.set_defaults(handler=cmd_info)


# -- adapters ------------------------------------------------------------------------------

# Format names on the command line and in JSON output, as the adapter store spells them.
_FORMAT_CHOICES = ("auto", "peft-lora", "mos", "compeft")


def _add_adapters(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    adapters = commands.add_parser("adapters", help="list, load or unload a running server's adapters")
    actions = adapters.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="print the adapters the server can serve as a JSON list")
    listing.set_defaults(handler=cmd_adapters_list)
    load = actions.add_parser(
        "load",
        help="load an adapter directory under a name; prints it as JSON",
        description="PATH is relative to one of the server's --adapter-root directories, or absolute "
        "inside one; it is resolved on the server.",
    )
    load.add_argument("name", help="the name requests will use (letters, digits, '.', '_', '-')")
    load.add_argument("path", help="the adapter directory, inside an adapter root of the server")
    load.add_argument("--format", choices=_FORMAT_CHOICES, default="auto", help="(default: detect)")
    load.add_argument("--replace", action="store_true", help="replace an adapter of that name")
    load.set_defaults(handler=cmd_adapters_load)
    unload = actions.add_parser("unload", help="unload an adapter, freeing its memory and device slot")
    unload.add_argument("name")
    unload.set_defaults(handler=cmd_adapters_unload)
    examples = actions.add_parser(
        "examples",
        help="teach the router an adapter's example prompts (RegisterExamples); prints what it learned",
        description='FILE holds one JSON object per line with a "prompt" string (as an adapter\'s '
        "examples.jsonl); at most 256 prompts per call. Learning takes seconds.",
    )
    examples.add_argument("name", help="the adapter")
    examples.add_argument("file", metavar="FILE.jsonl", help="the example prompts")
    examples.set_defaults(handler=cmd_adapters_examples)
    for action in (listing, load, unload, examples):
        _add_target(action, admin=action is not listing)
        action.add_argument(
            "--timeout", type=float, default=60.0, help="deadline in seconds (default: %(default)s)"
        )


# -- eval ----------------------------------------------------------------------------------


def _add_eval(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from tasks import TASK_NAMES
    from tasks.evaluate import cmd_eval

    evaluate = commands.add_parser(
        "eval",
        help="score a running server on a demo task's held-out (or validation) set",
        description="Sends each held-out (--split validation: validation) prompt of the task as one user chat message (greedy, the "
        "task's max_tokens) and prints the task's metric. gRPC by default, the OpenAI HTTP API with "
        "--http. See tasks/README.md.",
    )
    evaluate.add_argument("--task", required=True, choices=TASK_NAMES)
    evaluate.add_argument("--adapter", default="", help="adapter name; '' = the base model")
    _add_target(evaluate)
    evaluate.add_argument(
        "--http", default=None, metavar="URL", help="use the OpenAI HTTP API at URL instead"
    )
    evaluate.add_argument("--compare-base", action="store_true", help="also run the base model: two rows")
    evaluate.add_argument(
        "--against",
        default="",
        metavar="ADAPTER",
        help="also run ADAPTER and compare --adapter with it prompt by prompt: higher / lower / same, "
        "score ratio and difference with 95%% paired-bootstrap intervals (a compressed adapter "
        "against its source LoRA, say)",
    )
    evaluate.add_argument(
        "--split",
        choices=("heldout", "validation", "confirm"),
        default="heldout",
        help="the hand-written set to score: heldout (tasks/heldout, what results report), "
        "validation (tasks/validation, for choosing settings) or confirm (tasks/confirm, a second "
        "held-out set for a close call; sql only) (default: %(default)s)",
    )
    evaluate.add_argument("--limit", type=_positive, default=None, help="only the first N prompts of the set")
    evaluate.add_argument(
        "--concurrency", type=_positive, default=8, help="requests in flight (default: %(default)s)"
    )
    evaluate.add_argument(
        "--timeout", type=float, default=120.0, help="deadline per request in seconds (default: %(default)s)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the rows as JSON")
    evaluate.add_argument(
        "--answers", default=None, metavar="FILE", help="write every answer and its score (JSONL)"
    )
    evaluate.set_defaults(handler=cmd_eval)


# -- bench ---------------------------------------------------------------------------------


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    targets = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    for name, summary in _BENCHMARKS.items():
        # add_help=False: -h/--help reaches the benchmark's own parser, which knows its flags.
        target = targets.add_parser(
            name, add_help=False, help=f"{summary} (see `loramux bench {name} --help`)"
        )
        target.set_defaults(handler=_cmd_bench, accepts_extra=True)


# `loramux bench NAME` runs bench/NAME_bench.py (its add_arguments / main).
_BENCHMARKS = {
    "engine": "engine vs transformers generate",
    "adapters": "multi-adapter decode vs base-only and PEFT",
    "memory": "resident memory over 1,000 distinct adapters through a small host cache",
    "cpu-share": "one request's latency, quiet vs beside a busy neighbour process",
    "sampling": "next-token sampling, new sampler vs the old per-row sort",
    "penalties": "batch-32 decode with penalties / min_p on some or all rows vs none; the processor's cost",
    "logprobs": "decode at batch 32 with logprobs (top 5) on every row vs none, interleaved",
    "grammar": "structured output: xgrammar vs llguidance on our vocabulary; batch 32 with 8 schema-constrained",
    "attack": "a live server attacked as a hostile user would (malformed adapters, fuzzing, slow clients)",
    "formats": "LoRA, MoS and ComPEFT adapters: bytes, adapters per GiB, cold load, batch-32 decode",
    "device-forms": "the loader's work to build the MoS / ComPEFT compact GPU forms, timed on CPU",
    "compeft-factors": "ComPEFT of an adapter's factors as trained, balanced or canonical (SVD): error, kept A/B",
    "mixture": "decode with 2- and 3-adapter weighted mixtures vs one adapter and the base model",
    "router": "the router: layer sweep, routing accuracy, auto vs named, growth to 64 adapters, cost",
    "load": "load-test a running server (gRPC or OpenAI HTTP): latencies, per adapter, cold vs warm, canaries",
    "scaling": "the scaling study: 8 to 1,000 adapters (and the demo adapters) under zipf traffic",
    "make-adapters": "write N random, distinct PEFT LoRA adapters for the base model (scaling runs)",
    "replicas": "one loramux serve vs loramux on Ray Serve with 1 and 2 replicas: latency, affinity",
    "cluster-sim": "a simulated fleet of R replicas x S slots: routing policies, hit rates, cold loads, TTFT",
    "metrics": "what a /metrics scrape costs as adapter labels grow, with and without --metrics-max-adapters",
}


def _cmd_bench(args: argparse.Namespace, extra: list[str]) -> int:
    name = args.bench_command
    try:
        module = importlib.import_module(f"bench.{name.replace('-', '_')}_bench")
    except ImportError as exc:
        print(f"error: the {name} benchmark is not available ({exc})", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog=f"loramux bench {name}", description=module.__doc__)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(extra)))


# -- train ---------------------------------------------------------------------------------


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    import dataclasses

    from server.train_commands import cmd_train  # the handler; it imports torch only when run
    from training.config import METHODS, SAVE_DTYPES, TrainConfig

    default = {field.name: field.default for field in dataclasses.fields(TrainConfig)}  # = flag defaults
    train = commands.add_parser(
        "train",
        help="train a LoRA (PEFT) or MoS adapter on the base model (CPU)",
        description="Trains an adapter on chat rows and saves it as a directory that "
        "`loramux serve --adapter-root` serves: a PEFT LoRA (--method lora) or a Mixture-of-Shards "
        "adapter (--method mos: per-layer rank --rank assembled from shard pools shared by all "
        "layers, as many parameters as a LoRA of rank --equivalent-rank). Each line of --data is a JSON object: "
        '{"prompt": ..., "response": ...} (optional "system"), or {"messages": [{"role": ..., '
        '"content": ...}, ...]} whose last message is the assistant\'s answer. The loss covers the '
        "answer and its end-of-turn token, rendered with the chat template the server applies.",
    )
    train.add_argument("--data", required=True, metavar="FILE.jsonl", help="training rows, one JSON per line")
    train.add_argument("--out", required=True, metavar="DIR", help="the adapter directory to write")
    train.add_argument(
        "--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct)"
    )
    train.add_argument(
        "--cache-dir",
        default=None,
        help="converted-model cache (default: $LORAMUX_CACHE or ~/.cache/loramux)",
    )
    train.add_argument(
        "--method",
        choices=METHODS,
        default=default["method"],
        help="lora: a PEFT LoRA directory; mos: a Mixture-of-Shards (`mos`) directory (default: %(default)s)",
    )
    train.add_argument(
        "--rank",
        type=int,
        default=default["rank"],
        help="LoRA rank (MoS: the per-layer rank r); serve with --max-rank >= it (default: %(default)s)",
    )
    train.add_argument(
        "--alpha",
        type=float,
        default=default["alpha"],
        help="LoRA alpha; scale = alpha/rank (default: %(default)s)",
    )
    train.add_argument(
        "--targets",
        default=default["targets"],
        help="all-linear, or projections joined by commas, e.g. q_proj,v_proj (default: %(default)s)",
    )
    mos = train.add_argument_group("MoS (--method mos)")
    mos.add_argument(
        "--shards",
        type=int,
        default=default["shards"],
        help="shards per vector l; must divide every targeted projection's sizes (default: %(default)s)",
    )
    mos.add_argument(
        "--equivalent-rank",
        type=float,
        default=default["equivalent_rank"],
        help="R: the pools hold as many parameters as a LoRA of this rank (default: %(default)s)",
    )
    mos.add_argument(
        "--private-rank",
        type=float,
        default=default["private_rank"],
        help="p: rows each layer owns; (R - p) * layers * l and p * l must be whole (default: %(default)s)",
    )
    train.add_argument(
        "--steps", type=int, default=default["steps"], help="optimizer steps (default: %(default)s)"
    )
    train.add_argument(
        "--lr",
        type=float,
        default=default["lr"],
        help="peak AdamW learning rate, warmup then cosine (default: %(default)s)",
    )
    train.add_argument(
        "--batch-size", type=int, default=default["batch_size"], help="rows per step (default: %(default)s)"
    )
    train.add_argument(
        "--seed",
        type=int,
        default=default["seed"],
        help="same data + seed = same adapter (default: %(default)s)",
    )
    train.add_argument(
        "--max-length",
        type=int,
        default=default["max_length"],
        help="most tokens in one row, prompt + answer (default: %(default)s)",
    )
    train.add_argument(
        "--dtype",
        choices=SAVE_DTYPES,
        default=default["dtype"],
        help="dtype of the saved weights; training runs in fp32 (default: %(default)s)",
    )
    train.add_argument(
        "--threads",
        type=int,
        default=default["threads"],
        help="torch threads (default: as `serve`, the CPUs this process may use); the same seed gives "
        "the same adapter at the same thread count",
    )
    train.set_defaults(handler=cmd_train)


# -- compress ------------------------------------------------------------------------------


def _add_compress(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.compress_commands import cmd_compress  # the handler; it imports torch only when run

    compress = commands.add_parser(
        "compress",
        help="compress a PEFT LoRA adapter (ComPEFT) and report its fidelity",
        description="Writes DST, a compeft adapter that `loramux serve` serves: the top --density "
        "fraction of the adapter's LoRA entries by magnitude, kept as signs with one scale gamma = "
        "alpha * std. Prints its size and its fidelity (top-1 agreement, mean KL) against the "
        "uncompressed adapter on held-out prompts: --prompts, else SRC/examples.jsonl, else built-in "
        'ones; each line {"prompt": ...}; the first half calibrates --alpha auto, the second is reported.',
    )
    compress.add_argument("src", metavar="SRC", help="the PEFT LoRA adapter directory to compress")
    compress.add_argument("dst", metavar="DST", help="the directory to write (new or empty)")
    compress.add_argument("--method", choices=["compeft"], default="compeft", help="(default: %(default)s)")
    compress.add_argument(
        "--density", type=_density, required=True, help="fraction of entries kept, in (0, 1], e.g. 0.1"
    )
    compress.add_argument(
        "--alpha",
        type=_alpha,
        default=None,
        metavar="A|auto",
        help="gamma = alpha * std of the entries; auto picks it by least mean KL on the calibration "
        "prompts (default: auto)",
    )
    compress.add_argument(
        "--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M-Instruct)"
    )
    compress.add_argument(
        "--cache-dir",
        default=None,
        help="converted-model cache (default: $LORAMUX_CACHE or ~/.cache/loramux)",
    )
    compress.add_argument(
        "--prompts",
        default=None,
        metavar="FILE.jsonl",
        help='calibration and report prompts, {"prompt": ...} per line',
    )
    compress.add_argument(
        "--factors",
        choices=("svd", "balanced", "as-trained"),
        default=None,
        help="which factors of each module's B A to compress (the adapter is the same; signs with "
        "one scale approximate some factors better): svd = B A's canonical factors U sqrt(S), "
        "sqrt(S) V^T (default; the least error on trained LoRAs); balanced = A and B rescaled to "
        "equal norms; as-trained = ComPEFT as published, which keeps almost nothing of B when a "
        "trained LoRA's A is larger than its B",
    )
    compress.add_argument(
        "--no-balance",
        dest="factors",
        action="store_const",
        const="as-trained",
        help="the same as --factors as-trained (kept for older scripts)",
    )
    compress.set_defaults(handler=cmd_compress)


def _density(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _alpha(text: str) -> float | None:
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or auto, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number or auto, got {text}")
    return value


# -- export --------------------------------------------------------------------------------


def _add_export(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from server.export_commands import cmd_export  # the handler; it imports torch only when run

    export = commands.add_parser(
        "export",
        help="write an adapter of any format as a PEFT LoRA directory",
        description="Loads SRC as the server would (format detected: peft-lora, mos, ...; validated "
        "against --model's dims) and writes its materialized LoRA factors to DST as a standard PEFT "
        "directory (adapter_config.json + adapter_model.safetensors) that PEFT and loramux load. "
        "Each module keeps its rank and exact scale (rank_pattern / alpha_pattern where they differ).",
    )
    export.add_argument("--to", required=True, choices=["peft-lora"], help="the output format")
    export.add_argument("src", metavar="SRC", help="the adapter directory to read")
    export.add_argument("dst", metavar="DST", help="the directory to write (new, or empty)")
    export.add_argument(
        "--model",
        default=None,
        help="the base model the adapter is for: checkpoint directory or GGUF file; only its config "
        "is read (default: SmolLM2-135M-Instruct)",
    )
    export.add_argument(
        "--cache-dir",
        default=None,
        help="converted-model cache (default: $LORAMUX_CACHE or ~/.cache/loramux)",
    )
    export.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the written factors (default: %(default)s)",
    )
    export.set_defaults(handler=cmd_export)


if __name__ == "__main__":
    sys.exit(main())
