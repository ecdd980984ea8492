"""Attack groups on the adapter store: malformed adapters, stale files, path leaks.

Each group takes a running server (`ServerProcess` + its `Probe`) and returns report rows. A case
that leaves the server unable to serve gets the server restarted (noted in the row) so the groups
after it still measure something. This module knows the attacks, not how the report prints.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from bench.attack_corpus import PICKLE_MARKER, Case, ModelDims, write_good_adapter
from bench.attack_report import Row, absolute_paths, message_problems, verdict
from bench.attack_server import Probe, Reply, ServerProcess
from loramux.v1 import inference_pb2 as pb

REFUSED_GRPC = ("INVALID_ARGUMENT", "NOT_FOUND")
REFUSED_HTTP = ("400", "404")


class Lab:
    """The server under attack, its probe and the paths it must never reveal."""

    def __init__(self, server: ServerProcess, probe: Probe, secrets: tuple[str, ...]) -> None:
        self.server, self.probe, self.secrets = server, probe, secrets

    def still_serving(self) -> tuple[str, bool]:
        """The 'served meanwhile' cell; restarts a server that stopped serving."""
        alive = self.probe.alive()
        if alive.ok:
            return "yes", True
        for _ in range(10):  # a slow recovery is not a restart
            time.sleep(1.0)
            if self.probe.alive().ok:
                return alive.cell() + "; recovered", False
        self.probe.close()
        self.server.restart()
        self.probe = Probe(self.server, baseline=self.probe.baseline)
        return alive.cell() + "; RESTARTED the server", False


# -- 1. malformed adapters ----------------------------------------------------------------------


def malformed_adapters(lab: Lab, cases: list[Case], corpus: Path, outside: Path) -> list[Row]:
    rows = []
    ordered = [case for case in cases if case.kind != "hazard"] + [
        case for case in cases if case.kind == "hazard"
    ]
    for case in ordered:
        placed = lab.server.adapter_root / case.name
        (corpus / case.name).rename(placed)
        try:
            if case.name == "targets-evil-regex":
                rows.append(_evil_regex(lab, case))
            elif case.name == "w-sparse-500mb":
                rows.append(_sparse(lab, case))
            else:
                rows.append(_one_case(lab, case, outside))
        finally:
            placed.rename(corpus / case.name)
    return rows


def _judge(lab: Lab, case: Case, grpc_reply: Reply, http_reply: Reply) -> tuple[bool, list[str]]:
    notes = []
    if case.expect == "served":
        ok = grpc_reply.status == "OK" and http_reply.status == "200"
    else:
        ok = grpc_reply.status in REFUSED_GRPC and http_reply.status in REFUSED_HTTP
    if not ok:
        notes.append("WRONG CODE")
    if case.expect == "refused":
        for where, reply in (("gRPC", grpc_reply), ("HTTP", http_reply)):
            problems = message_problems(reply.message, lab.secrets)
            if problems:
                ok = False
                notes.append(f"{where}: {'; '.join(problems)}")
        if "json" not in http_reply.content_type:
            ok = False
            notes.append(f"HTTP body is {http_reply.content_type or 'untyped'}")
    return ok, notes


def _one_case(lab: Lab, case: Case, outside: Path) -> Row:
    grpc_reply = lab.probe.generate(case.name, timeout=30)
    http_reply = lab.probe.complete(case.name, timeout=30)
    ok, notes = _judge(lab, case, grpc_reply, http_reply)
    if grpc_reply.status == "OK" and case.expect == "refused":
        notes.append(f"generated tokens {list(grpc_reply.token_ids)[:8]}")
    if (outside / PICKLE_MARKER).exists():
        ok = False
        notes.append("THE SERVER UNPICKLED the .bin (marker file written)")
        (outside / PICKLE_MARKER).unlink()
    meanwhile, alive = lab.still_serving()
    message = grpc_reply.message or http_reply.message
    return Row(
        "1. Malformed adapters", f"{case.name}: {case.sent}",
        "served" if case.expect == "served" else "INVALID_ARGUMENT/NOT_FOUND, 400/404 JSON, clear message",
        f"gRPC {grpc_reply.status}, HTTP {http_reply.short()}: {message[:160]}",
        grpc_reply.seconds + http_reply.seconds, meanwhile, verdict(ok and alive), "; ".join(notes),
    )  # fmt: skip


def _evil_regex(lab: Lab, case: Case) -> Row:
    """The catastrophic regex, with /health and GetInfo timed while it runs."""
    result: dict[str, Reply] = {}
    worker = threading.Thread(
        target=lambda: result.setdefault("grpc", lab.probe.generate(case.name, timeout=60))
    )
    worker.start()
    time.sleep(1.0)
    started = time.monotonic()
    health_ok = lab.probe.http_health(10)
    health_s = time.monotonic() - started
    info = lab.probe.call("GetInfo", pb.GetInfoRequest(), timeout=10)
    worker.join()
    grpc_reply = result["grpc"]
    notes = [f"concurrent /health {'200' if health_ok else 'no answer'} in {health_s:.2f} s, "
             f"GetInfo {info.status} in {info.seconds:.2f} s"]  # fmt: skip
    http_reply = (
        lab.probe.complete(case.name, timeout=20) if grpc_reply.seconds < 10 else Reply("skipped", 0.0)
    )
    ok = grpc_reply.status in REFUSED_GRPC and grpc_reply.seconds < 2 and health_ok and health_s < 2
    meanwhile, alive = lab.still_serving()
    return Row(
        "1. Malformed adapters", f"{case.name}: {case.sent}",
        "refused in < 2 s; /health and GetInfo answer meanwhile",
        f"gRPC {grpc_reply.status} after {grpc_reply.seconds:.1f} s, HTTP {http_reply.short()}: {grpc_reply.message[:120]}",
        grpc_reply.seconds, meanwhile, verdict(ok and alive), "; ".join(notes),
    )  # fmt: skip


def _sparse(lab: Lab, case: Case) -> Row:
    """Four requests for the 500 MB adapter; the server's RSS before and after."""
    before = lab.server.rss_mib()
    replies = []
    for _ in range(2):
        replies += [lab.probe.generate(case.name, timeout=60), lab.probe.complete(case.name, timeout=60)]
    time.sleep(1.0)
    after = lab.server.rss_mib()
    grown = after - before
    refused = all(reply.status in REFUSED_GRPC + REFUSED_HTTP for reply in replies)
    meanwhile, alive = lab.still_serving()
    return Row(
        "1. Malformed adapters", f"{case.name}: {case.sent}; 4 requests",
        "refused each time; RSS grows < 100 MiB",
        f"{', '.join(reply.status for reply in replies)}; RSS {before:.0f} -> {after:.0f} MiB (+{grown:.0f})",
        sum(reply.seconds for reply in replies), meanwhile, verdict(refused and grown < 100 and alive),
        replies[0].message[:160],
    )  # fmt: skip


# -- 2. stale files -----------------------------------------------------------------------------


def stale_files(lab: Lab, dims: ModelDims, staging: Path) -> list[Row]:
    rows = []
    root = lab.server.adapter_root
    fresh = write_good_adapter(root / "stale-fresh", dims, seed=22)  # the new weights under a never-seen name
    expected_new = lab.probe.generate("stale-fresh").token_ids
    for how in ("overwrite files in place", "rename a new directory over the old"):
        name = "stale-inplace" if how.startswith("overwrite") else "stale-renamed"
        write_good_adapter(root / name, dims, seed=11)
        old = lab.probe.generate(name)
        started = time.monotonic()
        if how.startswith("overwrite"):
            for file in fresh.iterdir():
                shutil.copyfile(file, root / name / file.name)
        else:
            shutil.copytree(fresh, staging / name)
            shutil.rmtree(root / name)
            (staging / name).rename(root / name)
        time.sleep(2.0)
        replies = [lab.probe.generate(name) for _ in range(3)]
        newest = replies[-1]
        ok = newest.token_ids == expected_new and old.token_ids != expected_new
        got = ("new weights" if newest.token_ids == expected_new else
               "OLD weights" if newest.token_ids == old.token_ids else f"{newest.status}, other tokens")  # fmt: skip
        meanwhile, alive = lab.still_serving()
        rows.append(Row("2. Stale files", f"serve an adapter, then {how}; request 3 more times",
                        "the new weights (same tokens as a fresh name with them)", got,
                        time.monotonic() - started, meanwhile, verdict(ok and alive),
                        f"old {list(old.token_ids)[:5]}, now {list(newest.token_ids)[:5]}, fresh {list(expected_new)[:5]}"))  # fmt: skip
    shutil.rmtree(root / "stale-renamed")
    gone = lab.probe.generate("stale-renamed")
    meanwhile, alive = lab.still_serving()
    rows.append(Row("2. Stale files", "serve an adapter, then delete its directory; request it",
                    "NOT_FOUND (it is no longer servable)", f"gRPC {gone.status}: {gone.message[:120]}",
                    gone.seconds, meanwhile, verdict(gone.status == "NOT_FOUND" and alive)))  # fmt: skip
    return rows


# -- 6. path leaks ------------------------------------------------------------------------------


def path_leaks(lab: Lab, broken: Path) -> list[Row]:
    """As an API-key holder (not admin): do answers reveal absolute server paths?"""
    rows = []
    placed = lab.server.adapter_root / broken.name
    shutil.copytree(broken, placed)
    try:
        probes: list[tuple[str, Any]] = [
            ("GET /v1/models (`root` of each model)", lambda: lab.probe.http("GET", "/v1/models")),
            ("GET /v1/models/good", lambda: lab.probe.http("GET", "/v1/models/good")),
            ("gRPC ListAdapters (`source`)", lambda: lab.probe.call("ListAdapters", pb.ListAdaptersRequest())),
            ("gRPC GetInfo", lambda: lab.probe.call("GetInfo", pb.GetInfoRequest())),
            ("gRPC Generate on an unknown adapter", lambda: lab.probe.generate("no-such-adapter")),
            (f"gRPC Generate on a broken adapter ({broken.name})", lambda: lab.probe.generate(broken.name)),
            (f"HTTP completion on a broken adapter ({broken.name})", lambda: lab.probe.complete(broken.name)),
            ("HTTP load_lora_adapter with the API key (not admin)", lambda: lab.probe.http(
                "POST", "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"})),
            ("gRPC LoadAdapter with the API key (not admin)", lambda: lab.probe.call(
                "LoadAdapter", pb.LoadAdapterRequest(name="x", path="/etc"))),
        ]  # fmt: skip
        for attack, run in probes:
            reply = run()
            text = (
                reply.message
                + " "
                + (json.dumps(reply.body) if isinstance(reply.body, (dict, list)) else str(reply.body or ""))
            )
            leaked = absolute_paths(text, lab.secrets)
            rows.append(Row("6. Path leaks", attack, "no absolute server path in the answer",
                            f"{reply.short()}: {'leaks ' + leaked[0][:100] if leaked else 'no path'}",
                            reply.seconds, "", verdict(not leaked), f"{len(leaked)} distinct paths" if leaked else ""))  # fmt: skip
    finally:
        shutil.rmtree(placed)
    meanwhile, _ = lab.still_serving()
    for row in rows:
        row.meanwhile = meanwhile
    return rows
