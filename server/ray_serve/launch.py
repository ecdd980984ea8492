"""`loramux ray`: deploy the loramux application on Ray Serve and serve until SIGINT/SIGTERM.

With `RayConfig.address` it joins that Ray cluster; without, it starts a Ray instance on this
machine (no dashboard) with at least as many logical CPUs as the replicas reserve, so that every
replica starts even where they oversubscribe the cores (said in the log). Ray Serve's HTTP proxy
listens on the server's host and HTTP port. On a signal it deletes the application (and stops
the Ray instance it started). Returns the exit status: 0 after a signal; 1 when ray is not
installed (saying how to install it) or the application could not be deployed; 2 for settings
that make no sense under Ray.

It does not parse flags (`server/cli.py` does) nor know what a replica does (`app.py`).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.ray_serve.settings import RayConfig

logger = logging.getLogger("loramux")

INSTALL_HINT = (
    "ray is not installed: install the extra with `pip install -e '.[ray]'` (or `pip install "
    "loramux[ray]`), pinned with `-c requirements/constraints.txt`; `make serve-ray` does it"
)


def cmd_ray(config: ServerConfig, ray_config: RayConfig) -> int:
    """Deploy `ray_config.replicas` loramux replicas of `config` and serve until a signal."""
    if config.http_port == 0:
        print("error: Ray Serve needs an HTTP port (--http-port)", file=sys.stderr)
        return 2
    if config.enable_admin:
        print(
            "error: --enable-admin is not available under Ray Serve: every replica serves the "
            "adapters in its adapter roots; add or remove them there",
            file=sys.stderr,
        )
        return 2
    try:
        import ray
        from ray import serve

        from server.ray_serve.app import application
    except ImportError as exc:
        print(f"error: {INSTALL_HINT} ({exc})", file=sys.stderr)
        return 1
    local = ray_config.address is None
    if local:
        needed = math.ceil(ray_config.replicas * ray_config.replica_cpus)
        cpus = os.cpu_count() or 1
        if needed > cpus:
            logger.warning(
                "%d replicas reserve %d CPUs on a %d-CPU machine: they will share the cores",
                ray_config.replicas,
                needed,
                cpus,
            )
        ray.init(num_cpus=max(cpus, needed), include_dashboard=False)
    else:
        ray.init(address=ray_config.address)
    try:
        serve.start(http_options={"host": config.host, "port": config.http_port})
        serve.run(application(config, ray_config), name=ray_config.app_name, route_prefix="/")
    except Exception as exc:  # a replica that cannot start (no such model, ...) fails the deployment
        print(
            f"error: the application could not be deployed: {exc}{_why(ray_config.app_name)}", file=sys.stderr
        )
        _stop(local, ray_config.app_name)
        return 1
    logger.info(
        "loramux on Ray Serve: %d replicas, OpenAI API on http://%s:%d/v1 (Ctrl-C stops)",
        ray_config.replicas,
        config.host,
        config.http_port,
    )
    _wait_for_signal()
    logger.info("shutting down")
    _stop(local, ray_config.app_name)
    return 0


def _why(app_name: str) -> str:
    """What the failed deployments of the application say last (a replica's error), as lines."""
    from ray import serve

    try:
        deployments = serve.status().applications[app_name].deployments.values()
    except Exception:  # Serve itself did not come up: the exception says it all
        return ""
    reasons = [
        lines[-1] for d in deployments if (lines := [ln for ln in d.message.splitlines() if ln.strip()])
    ]
    return "".join(f"\n  {reason}" for reason in reasons)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _stop(local: bool, app_name: str) -> None:
    import ray
    from ray import serve

    try:
        if local:
            serve.shutdown()
        else:
            serve.delete(app_name)
    finally:
        ray.shutdown()
