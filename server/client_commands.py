"""The client commands: `loramux generate`, `info`, `route` and `adapters list|load|unload|examples`.

Each handler takes the parsed flags, makes one gRPC call to a running server (presenting the
API key, or the admin token for adapter changes), prints the result and returns the exit
status: 0 done, 1 the call failed (the status code and details go to stderr), 2 bad flags.
`generate_request` turns `generate` flags into a GenerateRequest; `adapter_info_json` turns an
AdapterInfo into the JSON the adapter commands print.

grpc and the generated protobuf modules are imported inside the handlers, and nothing here
imports torch or the engine, so client commands start fast. This module does not build
parsers (`server/cli.py` does) and knows nothing of the server beyond its gRPC API.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from loramux.v1 import inference_pb2 as pb


def _metadata(args: argparse.Namespace, *, admin: bool = False) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents the client's API key, or its admin token for admin calls."""
    from server.auth import bearer_metadata

    token = getattr(args, "admin_token", None) if admin else None
    return bearer_metadata(token or args.api_key)


def _report_rpc_error(err: grpc.RpcError) -> int:
    code, details = err.code(), err.details()  # type: ignore[attr-defined]
    print(f"error: {code.name}: {details}", file=sys.stderr)
    return 1


# -- generate ------------------------------------------------------------------------------


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
    if args.route_top_k is not None:
        request.route_top_k = args.route_top_k
    return request


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
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
            for chunk in stub.GenerateStream(request, timeout=args.timeout, metadata=_metadata(args)):
                if chunk.HasField("routing"):  # adapter auto: say what the router picked, apart from the text
                    _print_routing(chunk.routing)
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


def _print_routing(routing: Any) -> None:
    served = [f"{c.adapter} ({c.weight:.2f})" for c in routing.candidates if c.weight > 0]
    what = " + ".join(served) if served else f"the base model ({routing.reason})"
    print(f"[auto: {what}]", file=sys.stderr, flush=True)


# -- info ----------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace, extra: list[str]) -> int:
    import grpc
    from google.protobuf import json_format

    from loramux.v1 import inference_pb2 as pb
    from loramux.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            stub = pb_grpc.InferenceStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=args.timeout, metadata=_metadata(args))
        except grpc.RpcError as err:
            return _report_rpc_error(err)
    fields = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    print(json.dumps(fields, indent=2))
    return 0


# -- route ---------------------------------------------------------------------------------


def cmd_route(args: argparse.Namespace, extra: list[str]) -> int:
    from google.protobuf import json_format

    from loramux.v1 import inference_pb2 as pb

    request = pb.RouteRequest(top_k=args.top_k)
    if args.raw:
        request.prompt = args.prompt
    else:
        request.messages.add(role="user", content=args.prompt)
    response = _call_inference(args, "Route", request)
    if not isinstance(response, pb.RouteResponse):
        return 1
    fields = json_format.MessageToDict(
        response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for candidate in fields["candidates"]:
        candidate.pop("weight", None)  # set in Generate answers only
    print(json.dumps(fields, indent=2))
    return 0


# -- adapters ------------------------------------------------------------------------------


def adapter_info_json(info: pb.AdapterInfo) -> dict[str, object]:
    """An AdapterInfo as plain JSON: store names for format and tier, numbers as numbers."""
    from loramux.v1 import inference_pb2 as pb

    format_name = pb.AdapterFormat.Name(info.format).removeprefix("ADAPTER_FORMAT_")
    return {
        "name": info.name,
        "format": "" if format_name == "UNSPECIFIED" else format_name.lower().replace("_", "-"),
        "rank": info.rank,
        "bytes": info.bytes,
        "tier": pb.AdapterTier.Name(info.tier).removeprefix("ADAPTER_TIER_").lower(),
        "pinned": info.pinned,
        "load_count": info.load_count,
        "requests_served": info.requests_served,
        "target_modules": list(info.target_modules),
    }


def _call_inference(args: argparse.Namespace, method: str, request: object) -> object | None:
    """Call one unary Inference RPC; None (after printing the error) when it fails."""
    import grpc

    from loramux.v1 import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.target) as channel:
        try:
            call = getattr(pb_grpc.InferenceStub(channel), method)
            return call(request, timeout=args.timeout, metadata=_metadata(args, admin=True))
        except grpc.RpcError as err:
            _report_rpc_error(err)
            return None


def cmd_adapters_list(args: argparse.Namespace, extra: list[str]) -> int:
    from loramux.v1 import inference_pb2 as pb

    response = _call_inference(args, "ListAdapters", pb.ListAdaptersRequest())
    if not isinstance(response, pb.ListAdaptersResponse):
        return 1
    print(json.dumps([adapter_info_json(info) for info in response.adapters], indent=2))
    return 0


def cmd_adapters_load(args: argparse.Namespace, extra: list[str]) -> int:
    from loramux.v1 import inference_pb2 as pb

    format_pb = pb.ADAPTER_FORMAT_UNSPECIFIED
    if args.format != "auto":
        format_pb = pb.AdapterFormat.Value("ADAPTER_FORMAT_" + args.format.upper().replace("-", "_"))
    request = pb.LoadAdapterRequest(name=args.name, path=args.path, format=format_pb, replace=args.replace)
    response = _call_inference(args, "LoadAdapter", request)
    if not isinstance(response, pb.LoadAdapterResponse):
        return 1
    print(json.dumps(adapter_info_json(response.adapter), indent=2))
    return 0


def cmd_adapters_unload(args: argparse.Namespace, extra: list[str]) -> int:
    from loramux.v1 import inference_pb2 as pb

    response = _call_inference(args, "UnloadAdapter", pb.UnloadAdapterRequest(name=args.name))
    if response is None:
        return 1
    print(f"unloaded {args.name}")
    return 0


def cmd_adapters_examples(args: argparse.Namespace, extra: list[str]) -> int:
    from loramux.v1 import inference_pb2 as pb
    from server.router.examples import read_prompts_file

    try:
        prompts, _ = read_prompts_file(Path(args.file), args.file)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    request = pb.RegisterExamplesRequest(adapter=args.name, prompts=prompts)
    response = _call_inference(args, "RegisterExamples", request)
    if not isinstance(response, pb.RegisterExamplesResponse):
        return 1
    learned = {"adapter": response.adapter, "examples": response.examples, "steps": response.steps}
    print(json.dumps({**learned, "seconds": round(response.seconds, 3)}, indent=2))
    return 0
