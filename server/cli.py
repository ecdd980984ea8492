"""The `loramux` command line; the only module that parses flags.

    loramux serve     run the server (engine + gRPC) until SIGINT/SIGTERM
    loramux generate  stream one completion from a running server; prints only the text
    loramux info      print a running server's GetInfo as JSON
    loramux bench engine ...   engine micro-benchmark (flags belong to bench.engine_bench)

Heavy imports (torch, the engine, the benchmark) happen inside the command that needs them,
so client commands start fast. This module turns flags into a `ServerConfig` or a request;
it does not know how the engine or the service work.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from server.config import EngineConfig, ServerConfig

if TYPE_CHECKING:
    import grpc

    from loramux.v1 import inference_pb2 as pb
    from server.engine.engine import Engine

logger = logging.getLogger("loramux")

SHUTDOWN_GRACE_S = 5.0
ENGINE_WATCH_S = 1.0
Handler = Callable[[argparse.Namespace, list[str]], int]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: `bench engine` hands its flags on to the benchmark's own parser.
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler: Handler = args.handler
    return handler(args, extra)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loramux", description="Multi-adapter LLM inference server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_generate(commands)
    _add_info(commands)
    _add_bench(commands)
    return parser


# -- serve ---------------------------------------------------------------------------------


def _add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server, engine = ServerConfig(), EngineConfig()  # their defaults are the flags' defaults
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
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default=server.device)
    serve.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=server.dtype)
    serve.add_argument(
        "--max-running",
        type=int,
        default=engine.max_running,
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
        type=int,
        default=engine.max_batched_tokens,
        help="tokens per engine step (default: %(default)s)",
    )
    serve.add_argument(
        "--cache-dir",
        default=server.cache_dir,
        help="converted-model cache (default: $LORAMUX_CACHE or ~/.cache/loramux)",
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    serve.set_defaults(handler=_cmd_serve)


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
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
    return ServerConfig(
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        host=args.host,
        grpc_port=args.grpc_port,
        cache_dir=args.cache_dir,
        engine=engine,
    )


def _cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = server_config(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from server.runtime import build_engine

    try:
        engine = build_engine(config)
    except (OSError, ValueError) as exc:  # no such model, no CUDA, bad dtype, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1
    engine.start()
    try:
        return asyncio.run(_serve_until_signal(engine, config))
    except OSError as exc:  # the port is taken or the host is wrong
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.shutdown()


async def _serve_until_signal(engine: Engine, config: ServerConfig) -> int:
    from server.grpc_server import serve_grpc

    server = await serve_grpc(engine, config.host, config.grpc_port)
    logger.info("loramux serving %s on %s", engine.info.model_name, server.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    status = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=ENGINE_WATCH_S)
        except TimeoutError:
            if not engine.alive:  # let a supervisor restart us rather than serve errors
                logger.error("the engine thread died; shutting down")
                status = 1
                break
    logger.info("shutting down (running calls get %.0f s to finish)", SHUTDOWN_GRACE_S)
    await server.stop(SHUTDOWN_GRACE_S)
    return status


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
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as plain text, without the chat template"
    )
    generate.add_argument(
        "--max-tokens", type=_non_negative, default=None, help="most tokens to generate (server default: 64)"
    )
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--top-k", type=_non_negative, default=0, help="0 = off")
    generate.add_argument("--seed", type=_non_negative, default=None)
    generate.add_argument("--stop", nargs="+", default=[], metavar="S", help="stop strings")
    generate.add_argument("--adapter", default="", help="adapter name; '' = base model, 'auto' = router")
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    generate.set_defaults(handler=_cmd_generate)


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="127.0.0.1:50051", help="server address HOST:PORT (default: %(default)s)"
    )


def generate_request(args: argparse.Namespace) -> pb.GenerateRequest:
    """The GenerateRequest that `loramux generate` flags describe."""
    from loramux.v1 import inference_pb2 as pb

    request = pb.GenerateRequest(
        adapter=args.adapter,
        temperature=args.temperature,
        top_k=args.top_k,
        stop=args.stop,
    )
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.add(role="user", content=args.prompt)
    if args.max_tokens is not None:
        request.max_tokens = args.max_tokens
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.seed is not None:
        request.seed = args.seed
    return request


def _cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    import grpc

    from loramux.v1 import inference_pb2_grpc as pb_grpc

    try:
        request = generate_request(args)
    except ValueError as exc:  # e.g. a negative --max-tokens does not fit a uint32
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wrote_text = False
    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.InferenceStub(channel)
        try:
            for chunk in stub.GenerateStream(request, timeout=args.timeout):
                if chunk.text:
                    print(chunk.text, end="", flush=True)
                    wrote_text = True
        except grpc.RpcError as err:
            if wrote_text:
                print(flush=True)
            return _report_rpc_error(err)
        except KeyboardInterrupt:  # leaving the channel cancels the call; the server aborts it
            print(flush=True)
            return 130
    print(flush=True)
    return 0


def _report_rpc_error(err: grpc.RpcError) -> int:
    code, details = err.code(), err.details()  # type: ignore[attr-defined]
    print(f"error: {code.name}: {details}", file=sys.stderr)
    return 1


# -- info ----------------------------------------------------------------------------------


def _add_info(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    info = commands.add_parser("info", help="print a running server's GetInfo as JSON")
    _add_target(info)
    info.add_argument(
        "--timeout", type=float, default=10.0, help="deadline in seconds (default: %(default)s)"
    )
    info.set_defaults(handler=_cmd_info)


def _cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    import grpc
    from google.protobuf import json_format

    from loramux.v1 import inference_pb2 as pb
    from loramux.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            info = pb_grpc.InferenceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=args.timeout)
        except grpc.RpcError as err:
            return _report_rpc_error(err)
    fields = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(fields, indent=2))
    return 0


# -- bench ---------------------------------------------------------------------------------


def _add_bench(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    targets = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    # add_help=False: -h/--help reaches the benchmark's own parser, which knows its flags.
    engine = targets.add_parser(
        "engine", add_help=False, help="engine micro-benchmark (see `loramux bench engine --help`)"
    )
    engine.set_defaults(handler=_cmd_bench_engine, accepts_extra=True)


def _cmd_bench_engine(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        engine_bench = importlib.import_module("bench.engine_bench")
    except ImportError as exc:
        print(f"error: the engine benchmark is not available ({exc})", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog="loramux bench engine", description="Engine micro-benchmark.")
    engine_bench.add_arguments(parser)
    return int(engine_bench.main(parser.parse_args(extra)))


if __name__ == "__main__":
    sys.exit(main())
