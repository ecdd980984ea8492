"""`make demo-adapters`: generate each task's data, train its adapter with `loramux train`, measure it.

    python -m tasks.demo [--tasks sql,sentiment,extract,arith,shout] [--steps 150] [--out adapters]

For each task: draw `--rows` training examples from its generator (seeded; never a held-out
prompt), write them to `<work>/<task>/train.jsonl`, run `loramux train` on the default model
(SmolLM2-135M-Instruct) into `<out>/<task>` (fp16, all-linear, rank 3: under 2 MB), and write
`<out>/<task>/examples.jsonl` (the first `EXAMPLES` training prompts, for the router). Then a
real `loramux serve --adapter-root <out>` is started and every task's held-out set is scored
through its gRPC API, base model and adapter (`tasks.evaluate`, what `loramux eval` runs), and
one concurrent burst of every adapter and the base model is checked against each request's
greedy text alone. The results are printed as a markdown table and written as JSON
(`--report`). Nothing is downloaded. `--skip-train` only measures adapters already in `--out`.

This module drives the CLI and the APIs; it knows nothing of how training or serving work.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tasks import TASK_NAMES, get_task, write_jsonl
from tasks.evaluate import GrpcCompletions, evaluate

EXAMPLES = 40  # training prompts kept beside each adapter for the router
TRAIN_FLAGS = ("--rank", "3", "--alpha", "6", "--targets", "all-linear", "--lr", "1e-3", "--batch-size", "8")
BURST_PROMPTS = 2  # per task, in the one-burst check
SEED = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows generated per task")
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--threads", type=int, default=None, help="training threads (default: loramux's)")
    parser.add_argument("--out", default="adapters", help="the adapter root to write (default: adapters)")
    parser.add_argument("--work", default="build/demo", help="training data goes here (default: build/demo)")
    parser.add_argument("--report", default=None, help="write the results as JSON here")
    parser.add_argument("--skip-train", action="store_true", help="measure the adapters already in --out")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    for name in names:
        get_task(name)  # an unknown task fails before any work
    out, work = Path(args.out), Path(args.work)
    if not args.skip_train:
        for name in names:
            if train(name, out, work, args.rows, args.steps, args.threads) != 0:
                print(f"error: training the {name} adapter failed", file=sys.stderr)
                return 1
    results = measure(names, out)
    print(markdown(results))
    if args.report:
        Path(args.report).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def train(name: str, out: Path, work: Path, rows: int, steps: int, threads: int | None) -> int:
    """Write the task's training data and examples, then `loramux train` its adapter; the exit status."""
    task = get_task(name)
    examples = task.generate(random.Random(SEED), rows)
    data = work / name / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, ({"prompt": e.prompt, "response": e.response} for e in examples))
    command = [sys.executable, "-m", "server.cli", "train", "--data", str(data), "--out", str(out / name)]
    command += [*TRAIN_FLAGS, "--steps", str(steps), "--seed", str(SEED), "--dtype", "float16"]
    if threads is not None:
        command += ["--threads", str(threads)]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command, check=False).returncode
    if status == 0:
        write_jsonl(out / name / "examples.jsonl", ({"prompt": e.prompt} for e in examples[:EXAMPLES]))
    return status


def measure(names: list[str], out: Path) -> dict[str, Any]:
    """Serve `out` with a real `loramux serve`, score base and adapters, and check one mixed burst."""
    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--adapter-root",
        str(out),
        "--grpc-port",
        str(port),
    ]
    command += ["--max-slots", str(len(names) + 1), "--max-rank", "8"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    client = GrpcCompletions(f"127.0.0.1:{port}", os.environ.get("LORAMUX_API_KEY"), timeout=300.0)
    try:
        _wait_until_serving(client, server)
        tasks: dict[str, Any] = {}
        for name in names:
            task = get_task(name)
            base = evaluate(task, client, "")
            adapter = evaluate(task, client, name)
            info = json.loads((out / name / "training.json").read_text())
            tasks[name] = {
                "metric": task.metric,
                "base": round(base.score, 4),
                "adapter": round(adapter.score, 4),
                "heldout": len(adapter.answers),
                "train_seconds": round(float(info["seconds"]), 1),
                "train_steps": int(info["steps"]),
                "bytes": (out / name / "adapter_model.safetensors").stat().st_size,
            }
            tasks[name]["example"] = {  # the first held-out prompt, for the README's demo
                "prompt": adapter.answers[0].prompt,
                "base": base.answers[0].answer,
                "adapter": adapter.answers[0].answer,
            }
            print(f"{name}: base {base.score:.3f} -> adapter {adapter.score:.3f}", flush=True)
        burst = same_text_in_a_burst(client, names)
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=60)
    return {"tasks": tasks, "burst": burst}


def same_text_in_a_burst(client: GrpcCompletions, names: list[str]) -> dict[str, Any]:
    """Every adapter and the base model on a few held-out prompts: alone, then all in one burst."""
    requests = [
        (prompt, model, get_task(name).max_tokens)
        for name in names
        for prompt in [e.prompt for e in get_task(name).heldout()[:BURST_PROMPTS]]
        for model in (name, "")
    ]
    alone = [client.complete(*request) for request in requests]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        together = list(pool.map(lambda request: client.complete(*request), requests))
    differ = [f"{model or 'base'}: {prompt[:40]!r}" for (prompt, model, _), a, b in zip(requests, alone, together, strict=True) if a != b]  # fmt: skip
    return {"requests": len(requests), "differ": differ}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| task | metric | base | adapter | held-out prompts | training | adapter file |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["tasks"].items():
        lines.append(
            f"| {name} | {row['metric']} | {row['base']:.3f} | {row['adapter']:.3f} | {row['heldout']} | "
            f"{row['train_steps']} steps, {row['train_seconds']:.0f} s | {row['bytes'] / 1e6:.2f} MB |"
        )
    lines += ["", "| task | prompt (held out) | base model | adapter |", "|---|---|---|---|"]
    for name, row in results["tasks"].items():
        example = row["example"]
        cells = [_cell(example[key]) for key in ("prompt", "base", "adapter")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    burst = results["burst"]
    lines.append("")
    lines.append(
        f"One burst of {burst['requests']} requests (every adapter and the base model at once): "
        + ("each got the same greedy text as alone." if not burst["differ"] else f"differ: {burst['differ']}")
    )
    return "\n".join(lines)


def _cell(text: str, limit: int = 160) -> str:
    """`text` for one markdown table cell: one line, pipes escaped, at most `limit` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _wait_until_serving(
    client: GrpcCompletions, server: subprocess.Popen[bytes], timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"loramux serve exited with status {server.returncode}")
        try:
            client.complete("hi", "", 1)
            return
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(1.0)
    raise TimeoutError("loramux serve did not start in time")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1"}


if __name__ == "__main__":
    sys.exit(main())
