"""How loramux runs on Ray Serve, and the application arguments of `serve run` as flags.

`RayConfig` says what Ray reserves for each replica and how many there are; everything else a
replica needs is the `ServerConfig` that `loramux serve` would run. `serve run MODULE:build_app
key=value ...` and a `serve deploy` config's `args:` give the same settings as `loramux ray`'s
flags: `flags(args)` turns them into those flags (`adapter_root=DIR` -> `--adapter-root DIR`; a
list repeats the flag; true -> the bare flag, false -> nothing; `serve run` passes strings, so
"true" and "false" count as those), so `server/cli.py` parses and
validates both alike. Nothing here imports ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

APP_NAME = "loramux"
_BOOLEANS = {"true": True, "false": False}


@dataclass(frozen=True)
class RayConfig:
    """The Ray side of a deployment.

    replicas: engine replicas, each one whole loramux server (one Ray actor).
    replica_cpus / replica_gpus: what Ray reserves for each replica. Ray sets OMP_NUM_THREADS to
        the CPUs, which becomes the engine's torch threads unless --threads says otherwise; with
        no GPU reserved Ray hides the GPUs, so `--device auto` runs on the CPU.
    max_ongoing: requests Ray hands one replica at once; past it a request for an adapter that
        replica holds spills over to another replica (or waits). None = the engine's max_running,
        so a replica never queues what another could start.
    address: the Ray cluster to deploy on (`loramux ray` only): "auto" for the one this machine
        belongs to, ray://HOST:10001, ...; None = start a local Ray instance.
    app_name: the Serve application's name.
    """

    replicas: int = 2
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    max_ongoing: int | None = None
    address: str | None = None
    app_name: str = APP_NAME

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not self.replica_cpus >= 0 or not self.replica_gpus >= 0:
            raise ValueError(
                f"replica CPUs and GPUs must be >= 0, got {self.replica_cpus} and {self.replica_gpus}"
            )
        if self.max_ongoing is not None and self.max_ongoing < 1:
            raise ValueError(f"max_ongoing must be >= 1, got {self.max_ongoing}")
        if not self.app_name:
            raise ValueError("the application needs a name")


def flags(args: Mapping[str, object]) -> list[str]:
    """`loramux ray` flags for `serve run`'s key=value arguments (or a config file's `args:`)."""
    argv: list[str] = []
    for key, given in args.items():
        flag = "--" + key.replace("_", "-")
        value = _BOOLEANS.get(given.lower(), given) if isinstance(given, str) else given
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv
