"""Small things every `loramux` command shares: the version, gRPC targets, a quiet broken pipe.

`package_version()` is the installed package's version ("unknown" from an uninstalled source
tree). `grpc_target` is the argparse type of --target / --grpc-target: a HOST without a port gets
DEFAULT_GRPC_PORT (an IPv6 address is bracketed first); `unix:` and other URI-style targets pass
as given. `exit_quietly_on_broken_pipe` runs a command so that a reader that stops early
(`loramux adapters list | head -1`) ends it without a traceback, with the shell's status for a
process killed by SIGPIPE (141).

It does not parse any flag itself (server/cli.py does).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib import metadata

DEFAULT_GRPC_PORT = 50051
BROKEN_PIPE_STATUS = 128 + 13  # 128 + SIGPIPE, what a shell reports for a process it killed


def package_version() -> str:
    try:
        return metadata.version("loramux")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def grpc_target(text: str) -> str:
    """`text` as a gRPC target with a port: "host" -> "host:50051", "::1" -> "[::1]:50051"."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("the target is empty; give HOST or HOST:PORT")
    if "://" in text or text.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")):
        return text  # a gRPC URI: its scheme says how to read it
    if text.startswith("["):  # [v6] or [v6]:port
        return text if "]:" in text else f"{text}:{DEFAULT_GRPC_PORT}"
    if text.count(":") > 1:  # a bare IPv6 address
        return f"[{text}]:{DEFAULT_GRPC_PORT}"
    host, colon, port = text.rpartition(":")
    if not colon:
        return f"{text}:{DEFAULT_GRPC_PORT}"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST or HOST:PORT (a port is 1-65535)")
    return text


def exit_quietly_on_broken_pipe(command: Callable[[], int]) -> int:
    """`command()`'s status, its output flushed; BROKEN_PIPE_STATUS, silently, if stdout's reader left."""
    try:
        status = command()
        sys.stdout.flush()  # a pipe that closed shows here, not in the interpreter's exit
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit, which would fail and print a warning: point it at
        # /dev/null first (the recipe in Python's signal module documentation).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return BROKEN_PIPE_STATUS
