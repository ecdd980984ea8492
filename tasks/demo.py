"""`make demo-adapters`: generate each task's data, train its adapters with `loramux train`, measure them.

    python -m tasks.demo [--tasks sql,...] [--formats lora,mos,compeft] [--steps 150] [--out adapters]

For each task: draw `--rows` training examples from its generator (seeded; never a held-out
prompt), write them to `<work>/<task>/train.jsonl`, and build its adapters in every format asked:
`lora`: `loramux train` on the default model (SmolLM2-135M-Instruct) into `<out>/<task>` (fp16,
all-linear, rank 3: under 2 MB); `mos`: `loramux train --method mos` on the same rows into
`<out>/<task>-mos` (per-layer rank 4 from shard pools with a quarter of the LoRA's parameters);
`compeft`: `loramux compress --method compeft --alpha auto` of the LoRA at each of COMPEFT_DENSITIES
into `<out>/<task>-compeft-<percent>`, then `python -m tasks.compeft_alpha` re-picks each one's alpha
by the task metric on validation rows (`--skip-alpha`: keep the KL alpha). Each directory gets `examples.jsonl` (the first `EXAMPLES`
training prompts, for the router). Then a real `loramux serve --adapter-root <out>` is started and
every task's held-out set is scored through its gRPC API, base model and every adapter
(`tasks.evaluate`, what `loramux eval` runs), and one concurrent burst of every adapter and the
base model is checked against each request's greedy text alone. The results are printed as
markdown tables and written as JSON (`--report`). Nothing is downloaded. `--skip-train` only
measures adapters already in `--out`; `--skip-measure` only builds them.

This module drives the CLI and the APIs; it knows nothing of how training or serving work.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tasks import TASK_NAMES, get_task, write_jsonl
from tasks.evaluate import GrpcCompletions, evaluate
from tasks.serving import served

EXAMPLES = 160  # training prompts kept beside each adapter for the router (160: bench/RESULTS.md "Router")
TRAIN_FLAGS = ("--rank", "3", "--alpha", "6", "--targets", "all-linear", "--lr", "1e-3", "--batch-size", "8")
# MoS: r = 4 per layer, l = 4 shards, R = 0.75, p = 0.25: pools of 0.75 * 30 * 4 = 90 rows per
# projection, a quarter of the rank-3 LoRA's parameters; the same scale (alpha / r = 2) as the LoRA
MOS_FLAGS: tuple[str, ...] = ("--method", "mos", "--rank", "4", "--alpha", "8", "--shards", "4")
MOS_FLAGS += ("--equivalent-rank", "0.75", "--private-rank", "0.25", "--targets", "all-linear")
MOS_FLAGS += ("--batch-size", "8")
# MoS learning rate per task: the LoRA's 1e-3, except where 2e-3 scored higher on the task's
# validation set (bench/RESULTS.md: tried for the two tasks where 1e-3 missed the LoRA by > 5%)
MOS_LR = {"sql": 2e-3, "arith": 2e-3}
MOS_LR_DEFAULT = 1e-3
COMPEFT_DENSITIES = (0.05, 0.1, 0.2)
FORMATS = ("lora", "mos", "compeft")
BURST_PROMPTS = 2  # per task, in the one-burst check
SEED = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated (default: all)")
    parser.add_argument("--rows", type=int, default=2000, help="training rows generated per task")
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--threads", type=int, default=None, help="training threads (default: loramux's)")
    parser.add_argument(
        "--mos-lr",
        type=float,
        default=None,
        help="MoS learning rate for every task (default: MOS_LR's, per task)",
    )
    parser.add_argument("--out", default="adapters", help="the adapter root to write (default: adapters)")
    parser.add_argument("--work", default="build/demo", help="training data goes here (default: build/demo)")
    parser.add_argument("--report", default=None, help="write the results as JSON here")
    parser.add_argument("--skip-train", action="store_true", help="measure the adapters already in --out")
    parser.add_argument("--skip-measure", action="store_true", help="build the adapters, do not measure them")
    parser.add_argument(
        "--skip-alpha",
        action="store_true",
        help="keep the ComPEFT adapters' KL alpha (do not re-pick it on validation rows: tasks.compeft_alpha)",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.tasks.split(",") if name.strip()]
    for name in names:
        get_task(name)  # an unknown task fails before any work
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        parser.error(f"--formats: choose among {', '.join(FORMATS)}")
    out, work = Path(args.out), Path(args.work)
    if not args.skip_train:
        for name in names:
            for adapter_format in formats:
                if build(adapter_format, name, out, work, args) != 0:
                    print(f"error: building the {name} {adapter_format} adapter failed", file=sys.stderr)
                    return 1
        if "compeft" in formats and not args.skip_alpha and tune_alpha(names, out) != 0:
            print("error: picking the ComPEFT adapters' alpha on validation rows failed", file=sys.stderr)
            return 1
    if args.skip_measure:
        return 0
    results = measure(names, out)
    print(markdown(results))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def build(adapter_format: str, name: str, out: Path, work: Path, args: argparse.Namespace) -> int:
    """Build one task's adapter(s) of one format; the exit status of the first failing command."""
    if adapter_format == "compeft":
        for density in COMPEFT_DENSITIES:
            status = compress(name, out, density)
            if status != 0:
                return status
        return 0
    mos_lr = args.mos_lr or MOS_LR.get(name, MOS_LR_DEFAULT)
    flags = (*MOS_FLAGS, "--lr", f"{mos_lr:g}") if adapter_format == "mos" else TRAIN_FLAGS
    target = out / variant_name(name, adapter_format)
    return train(name, target, work, flags, args)


def variant_name(task: str, adapter_format: str, density: float | None = None) -> str:
    """The adapter's directory (and served name): `sql`, `sql-mos`, `sql-compeft-10`."""
    if adapter_format == "lora":
        return task
    if adapter_format == "mos":
        return f"{task}-mos"
    assert density is not None
    return f"{task}-compeft-{round(density * 100):02d}"


def train(name: str, target: Path, work: Path, flags: tuple[str, ...], args: argparse.Namespace) -> int:
    """Write the task's training data and examples, then `loramux train` into `target`; the exit status."""
    task = get_task(name)
    examples = task.generate(random.Random(SEED), args.rows)
    data = work / name / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(data, ({"prompt": e.prompt, "response": e.response} for e in examples))
    command = [sys.executable, "-m", "server.cli", "train", "--data", str(data), "--out", str(target)]
    command += [*flags, "--steps", str(args.steps), "--seed", str(SEED), "--dtype", "float16"]
    if args.threads is not None:
        command += ["--threads", str(args.threads)]
    print(f"== {target.name}: {' '.join(command[1:])}", flush=True)
    status = subprocess.run(command, check=False).returncode
    if status == 0:
        write_jsonl(target / "examples.jsonl", ({"prompt": e.prompt} for e in examples[:EXAMPLES]))
    return status


def compress(name: str, out: Path, density: float) -> int:
    """`loramux compress` the task's LoRA to ComPEFT at `density` (alpha picked automatically)."""
    source, target = out / name, out / variant_name(name, "compeft", density)
    command = [sys.executable, "-m", "server.cli", "compress", "--method", "compeft"]
    command += ["--density", str(density), "--alpha", "auto", str(source), str(target)]
    print(f"== {target.name}: {' '.join(command[1:])}", flush=True)
    if target.is_dir():  # an earlier build's: loramux compress writes only into an empty DST
        shutil.rmtree(target)
    status = subprocess.run(command, check=False).returncode
    if status == 0:
        shutil.copyfile(source / "examples.jsonl", target / "examples.jsonl")
    return status


def tune_alpha(names: list[str], out: Path) -> int:
    """`python -m tasks.compeft_alpha`: every ComPEFT adapter's alpha by its task metric on validation rows."""
    command = [sys.executable, "-m", "tasks.compeft_alpha", "--tasks", ",".join(names), "--out", str(out)]
    command += ["--densities", ",".join(map(str, COMPEFT_DENSITIES)), "--no-heldout"]
    print(f"== {' '.join(command[1:])}", flush=True)
    return subprocess.run(command, check=False).returncode


def measure(names: list[str], out: Path) -> dict[str, Any]:
    """Serve `out` with a real `loramux serve`, score base and every adapter of each task, check one burst."""
    with served(out, max_slots=len(names) + 1) as client:
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
                "variants": {"lora": describe(out / name) | {"score": round(adapter.score, 4)}},
            }
            for variant in variants(name, out):
                score = evaluate(task, client, variant).score
                tasks[name]["variants"][variant.removeprefix(f"{name}-")] = describe(out / variant) | {
                    "score": round(score, 4)
                }
            tasks[name]["example"] = {  # the first held-out prompt, for the README's demo
                "prompt": adapter.answers[0].prompt,
                "base": base.answers[0].answer,
                "adapter": adapter.answers[0].answer,
            }
            print(f"{name}: base {base.score:.3f} -> adapter {adapter.score:.3f}", flush=True)
        burst = same_text_in_a_burst(client, names)
    return {"tasks": tasks, "burst": burst}


def variants(name: str, out: Path) -> list[str]:
    """The task's compressed adapters present in `out` (the LoRA itself excluded), in a fixed order."""
    wanted = [variant_name(name, "mos")] + [variant_name(name, "compeft", d) for d in COMPEFT_DENSITIES]
    return [variant for variant in wanted if (out / variant).is_dir()]


def describe(directory: Path) -> dict[str, Any]:
    """An adapter directory's format, bytes of its weight and config files, and its parameters."""
    files = [
        f for f in directory.iterdir() if f.suffix in (".safetensors", ".json") and f.name != "training.json"
    ]
    info: dict[str, Any] = {"bytes": sum(f.stat().st_size for f in files)}
    for config_name, adapter_format in (
        ("adapter_config.json", "lora"),
        ("mos_config.json", "mos"),
        ("compeft_config.json", "compeft"),
    ):
        if (directory / config_name).is_file():
            info["format"] = adapter_format
            config = json.loads((directory / config_name).read_text())
            if adapter_format == "compeft":
                info["parameters"] = config.get("kept")
                info["alpha"] = config.get("alpha")
    training = directory / "training.json"
    if "parameters" not in info and training.is_file():
        info["parameters"] = json.loads(training.read_text()).get("parameters")
    return info


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
    if any(len(row.get("variants", {})) > 1 for row in results["tasks"].values()):
        lines += ["", "| task | adapter | format | score | of the LoRA's | parameters | bytes on disk |"]
        lines.append("|---|---|---|---:|---:|---:|---:|")
        for name, row in results["tasks"].items():
            lora = row["variants"]["lora"]["score"]
            for variant, v in row["variants"].items():
                share = f"{v['score'] / lora:.0%}" if lora else "-"
                parameters = f"{v['parameters']:,}" if v.get("parameters") else "-"
                lines.append(
                    f"| {name} | {variant} | {v.get('format', '?')} | {v['score']:.3f} | {share} | "
                    f"{parameters} | {v['bytes']:,} |"
                )
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


if __name__ == "__main__":
    sys.exit(main())
