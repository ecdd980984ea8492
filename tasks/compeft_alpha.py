"""Pick each shipped ComPEFT adapter's alpha by its task's metric on validation rows, as the ComPEFT paper does.

    python -m tasks.compeft_alpha [--tasks sql,...] [--densities 0.05,0.1,0.2]
                                  [--factors 0.7,0.85,1,1.2,1.4] [--validation 32] [--out adapters]

`loramux compress --alpha auto` picks alpha by the least KL against the source LoRA on 8 prompts;
ComPEFT (Yadav et al. 2023) tunes alpha on validation data by the task metric. For each task and
density this command takes the shipped adapter `<out>/<task>-compeft-<percent>` (its codes stay
as they are: alpha only sets gamma = alpha * sigma, and the served delta scales as alpha**2),
writes one candidate per factor, alpha = KL alpha * factor, into a temporary adapter root beside a
copy of the task's LoRA, serves them all from one `loramux serve` (gRPC, greedy) and scores every
candidate with the task's own metric (`Task.score`) on VALIDATION rows: the task's hand-written
validation set (tasks/validation/<task>.jsonl) and `--validation` rows from its generator with
VALIDATION_SEED, minus any prompt that is (up to case, punctuation and spacing) one the LoRA was
trained on or one of the held-out set. The best candidate wins (ties: the alpha closest to the
KL alpha, as a ratio) and the shipped adapter is rewritten with it; its compeft_config.json
records `alpha_source` and `alpha_validation` (every candidate's score), keeps what
`loramux compress` wrote, and examples.jsonl stays. The held-out prompts play no part in the
choice: after every choice is written, `--heldout` (default on) scores the LoRA, the KL-alpha
candidate and the chosen one on the held-out set in the same server, for the report only.

The KL alpha is the `alpha_validation.kl_alpha` of an adapter already tuned (so a second run starts
from the same candidates), else its `alpha`. This module drives the server through its API and
rewrites configs through adapters_store; it knows nothing of how either works inside.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from adapters_store import BaseModelSpec, load_compeft, save_compeft
from adapters_store.compeft_config import CONFIG_FILE, config_json, parse_compeft_config
from tasks import TASK_NAMES, Example, Task, get_task, prompt_key
from tasks.demo import variant_name
from tasks.evaluate import Completions, evaluate
from tasks.serving import served

VALIDATION_SEED = 1000  # training rows use tasks.demo.SEED = 0
VALIDATION = 32
FACTORS = (0.7, 0.85, 1.0, 1.2, 1.4)  # x0.5 never won (bench/RESULTS.md)
DENSITIES = (0.05, 0.1, 0.2)
IN_FLIGHT = 32  # requests in flight over all candidates (the server's default --max-running)
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_DRAWS_PER_ROW = 500
TRAINING_DEFAULTS = {"rows": 2000, "seed": 0}  # tasks.demo's, if the LoRA has no training.json


@dataclass(frozen=True)
class Candidate:
    """One alpha to try, served as `name` (the shipped variant's name and its factor)."""

    name: str
    factor: float
    alpha: float


@dataclass(frozen=True)
class Validation:
    """A task's validation rows: `handwritten` rows of its hand-written validation set, then the
    first new prompts its generator gave from `seed`, after skipping `skipped` draws that were a
    training, held-out or hand-written validation prompt (or a repeat)."""

    examples: tuple[Example, ...]
    skipped: int
    seed: int
    strict: bool  # training prompts excluded up to prompt_key; else only as exact strings
    handwritten: int = 0

    def source(self) -> str:
        unseen = (
            "prompts seen in training or held out skipped"
            if self.strict
            else "the generator has no question unseen in training: other surface forms (case, "
            "punctuation) of training prompts, held-out prompts skipped"
        )
        generated = len(self.examples) - self.handwritten
        return (
            f"validation task metric, {self.handwritten} hand-written rows (tasks/validation) and "
            f"{generated} generated rows, seed {self.seed} ({unseen}: {self.skipped})"
        )


def validation_examples(
    task: Task, n: int, *, seed: int = VALIDATION_SEED, training: Sequence[Example] = ()
) -> Validation:
    """The task's hand-written validation rows (`Task.validation`), then n rows drawn from
    `task.sample` with Random(seed), none a held-out or hand-written prompt or drawn before
    (compared by prompt_key: case, punctuation and spacing ignored), none a training prompt.

    Both kinds, because each misses what the other sees: generated rows come from the training
    distribution, where several alphas score alike; hand-written ones are phrased as people do
    (like the held-out set), but few.

    Not `task.generate(rng, n)` minus the collisions: a generator with few templates repeats
    training prompts often, and dropping them would leave too few rows. Training prompts are kept
    out by prompt_key too; where that leaves fewer than n (shout: its 2,000 training rows hold
    every one of its 517 questions), by exact string instead, and the result says so (`strict`)."""
    handwritten = task.validation()
    for strict in (True, False):
        examples, skipped = _draw(task, n, seed, training, strict, handwritten)
        if len(examples) == n:
            return Validation(tuple(handwritten + examples), skipped, seed, strict, len(handwritten))
    raise ValueError(f"{task.name}: only {len(examples)} validation prompts unseen in training")


def _draw(
    task: Task,
    n: int,
    seed: int,
    training: Sequence[Example],
    strict: bool,
    handwritten: Sequence[Example],
) -> tuple[list[Example], int]:
    heldout = {prompt_key(e.prompt) for e in [*task.heldout(), *handwritten]}
    trained = {prompt_key(e.prompt) if strict else e.prompt for e in training}
    rng, seen, skipped = random.Random(seed), set(), 0
    examples: list[Example] = []
    for _ in range(MAX_DRAWS_PER_ROW * n):
        if len(examples) == n:
            break
        example = task.sample(rng)
        key = prompt_key(example.prompt)
        if key in heldout or key in seen or (key if strict else example.prompt) in trained:
            skipped += 1
            continue
        seen.add(key)
        examples.append(example)
    return examples, skipped


def training_examples(task: Task, lora: Path) -> list[Example]:
    """The rows the task's LoRA was trained on, regenerated from its training.json (rows, seed)."""
    info = TRAINING_DEFAULTS
    if (lora / "training.json").is_file():
        info = json.loads((lora / "training.json").read_text())
    return task.generate(random.Random(int(info["seed"])), int(info["rows"]))


def kl_alpha(shipped: Path) -> float:
    """The alpha `loramux compress --alpha auto` chose for the shipped adapter."""
    document = json.loads((shipped / CONFIG_FILE).read_text())
    tuned = document.get("alpha_validation")
    return float(tuned["kl_alpha"] if isinstance(tuned, dict) else document["alpha"])


def write_candidates(
    shipped: Path, root: Path, factors: Sequence[float], spec: BaseModelSpec
) -> list[Candidate]:
    """One compeft directory per factor under `root`: the shipped codes with alpha = KL alpha * factor."""
    codes = load_compeft(shipped, spec, shipped.name).codes
    base_model = json.loads((shipped / CONFIG_FILE).read_text()).get("base_model")
    reference = kl_alpha(shipped)
    candidates = []
    for factor in factors:
        candidate = Candidate(f"{shipped.name}-x{round(factor * 100):03d}", factor, reference * factor)
        save_compeft(codes.with_alpha(candidate.alpha), root / candidate.name, base_model=base_model)
        candidates.append(candidate)
    return candidates


def choose(scored: Sequence[tuple[Candidate, float]], reference_alpha: float) -> Candidate:
    """The best-scoring candidate; among equal scores the alpha closest to `reference_alpha` (as a ratio)."""
    best = max(score for _, score in scored)
    tied = [candidate for candidate, score in scored if score == best]
    return min(tied, key=lambda c: abs(math.log(c.alpha / reference_alpha)))


def pick(
    client: Completions,
    task: Task,
    validation: Validation,
    candidates: Sequence[Candidate],
    reference_alpha: float,
) -> tuple[Candidate, list[list[float]]]:
    """Score every candidate on the validation rows (nothing else); the chosen one, [alpha, score] each."""
    scores = score_candidates(client, task, validation.examples, [c.name for c in candidates])
    chosen = choose(list(zip(candidates, scores, strict=True)), reference_alpha)
    return chosen, [[round(c.alpha, 6), round(s, 4)] for c, s in zip(candidates, scores, strict=True)]


def score_candidates(
    client: Completions, task: Task, examples: Sequence[Example], names: Sequence[str]
) -> list[float]:
    """Each adapter's mean task score on `examples`, all adapters' requests in flight together."""
    per_adapter = max(1, IN_FLIGHT // len(names))
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = pool.map(
            lambda name: evaluate(task, client, name, examples=examples, concurrency=per_adapter), names
        )
        return [result.score for result in results]


def adopt(shipped: Path, spec: BaseModelSpec, alpha: float, record: dict[str, Any]) -> None:
    """Rewrite the shipped adapter with `alpha`: the same codes (the weights file's bytes do not change),
    the config's other keys kept, `record` added (alpha_source, alpha_validation)."""
    adapter = load_compeft(shipped, spec, shipped.name)
    document = json.loads((shipped / CONFIG_FILE).read_text())
    own = set(config_json(parse_compeft_config(document, spec, str(shipped / CONFIG_FILE))))
    extra = {key: value for key, value in document.items() if key not in own}
    fidelity = extra.get("fidelity")
    if isinstance(fidelity, dict):  # loramux compress measured it at the KL alpha
        extra["fidelity"] = {"measured_at_alpha": kl_alpha(shipped), **fidelity}
    save_compeft(
        adapter.codes.with_alpha(alpha), shipped, base_model=document.get("base_model"), extra=extra | record
    )
    if load_compeft(shipped, spec, shipped.name).checksum != adapter.checksum:
        raise RuntimeError(f"{shipped}: rewriting alpha changed the weights file")


# -- the run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    names: tuple[str, ...]
    densities: tuple[float, ...]
    factors: tuple[float, ...]
    validation: int
    out: Path
    threads: int | None = None
    heldout: bool = True


def tune(options: Options) -> dict[str, Any]:
    """Choose and write every (task, density)'s alpha, then (options.heldout) measure the held-out scores."""
    spec = model_spec()
    report: dict[str, Any] = {"date": date.today().isoformat(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="compeft-alpha-") as tmp:
        root = Path(tmp)
        plans: dict[str, list[tuple[Path, list[Candidate]]]] = {}
        for name in options.names:
            (root / name).mkdir()
            for file in LORA_FILES:
                shutil.copyfile(options.out / name / file, root / name / file)
            plans[name] = []
            for density in options.densities:
                shipped = options.out / variant_name(name, "compeft", density)
                if not shipped.is_dir():
                    print(f"skipped: {shipped} does not exist", file=sys.stderr)
                    continue
                plans[name].append((shipped, write_candidates(shipped, root, options.factors, spec)))
        slots = max((len(plan) for plan in plans.values()), default=0) * len(options.factors) + 1
        with served(root, max_slots=slots, threads=options.threads, timeout=900.0) as client:
            # 1) choose on validation rows, write the choice: the held-out set is not read here
            for name in options.names:
                task = get_task(name)
                validation = validation_examples(
                    task, options.validation, training=training_examples(task, options.out / name)
                )
                rows: dict[str, Any] = {"validation_rows": len(validation.examples), "densities": {}}
                report["tasks"][name] = rows
                for shipped, candidates in plans[name]:
                    rows["densities"][shipped.name] = choose_and_adopt(
                        client, task, validation, (shipped, candidates), spec
                    )
            # 2) the held-out set, after every choice is written: LoRA, KL alpha, chosen alpha
            if options.heldout:
                measure_heldout(client, report, options.names)
    return report


def choose_and_adopt(
    client: Completions,
    task: Task,
    validation: Validation,
    plan: tuple[Path, list[Candidate]],
    spec: BaseModelSpec,
) -> dict[str, Any]:
    """Pick the shipped adapter's alpha among its candidates on the validation rows and rewrite it; its report row."""
    shipped, candidates = plan
    reference = kl_alpha(shipped)
    chosen, trials = pick(client, task, validation, candidates, reference)
    validation_record = {
        "kl_alpha": reference,
        "metric": task.metric,
        "rows": len(validation.examples),
        "seed": validation.seed,
        "candidates": trials,
        "chosen": chosen.alpha,
    }
    adopt(
        shipped,
        spec,
        chosen.alpha,
        {"alpha_source": validation.source(), "alpha_validation": validation_record},
    )
    print(f"{shipped.name}: alpha {reference:.3f} -> {chosen.alpha:.3f} ({trials})", flush=True)
    kl_candidate = next((c.name for c in candidates if c.factor == 1.0), None)
    return {
        "kl_alpha": reference,
        "alpha": chosen.alpha,
        "factor": chosen.factor,
        "validation": trials,
        "kl_candidate": kl_candidate,
        "chosen_candidate": chosen.name,
    }


def measure_heldout(client: Completions, report: dict[str, Any], names: Sequence[str]) -> None:
    """Score each task's LoRA, KL-alpha and chosen candidates on its held-out set into `report` (after choosing)."""
    for name in names:
        task = get_task(name)
        rows = report["tasks"][name]
        wanted = [name] + [
            adapter
            for row in rows["densities"].values()
            for adapter in (row["kl_candidate"], row["chosen_candidate"])
            if adapter
        ]
        wanted = list(dict.fromkeys(wanted))
        scores = dict(zip(wanted, score_candidates(client, task, task.heldout(), wanted), strict=True))
        rows["heldout_rows"] = len(task.heldout())
        rows["lora_heldout"] = scores[name]
        for row in rows["densities"].values():
            row["heldout_before"] = scores.get(row["kl_candidate"]) if row["kl_candidate"] else None
            row["heldout_after"] = scores[row["chosen_candidate"]]
        print(f"{name}: held-out LoRA {scores[name]:.3f}, {scores}", flush=True)


def model_spec() -> BaseModelSpec:
    """The default model's adapter spec (its config only: no weights are loaded)."""
    from transformers import AutoConfig

    from server.model.arch import ModelArch
    from server.model.loader import resolve_model_dir

    _, model_dir = resolve_model_dir(None)
    return ModelArch.from_hf_config(AutoConfig.from_pretrained(model_dir)).adapter_spec(max_rank=8)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| adapter | KL alpha | validation score per alpha (rows) | chosen alpha | held-out: LoRA | "
        "KL alpha | chosen alpha |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for rows in report["tasks"].values():
        lora = rows.get("lora_heldout")
        for adapter, row in rows["densities"].items():
            trials = ", ".join(f"{a:.2f}: {s:.3f}" for a, s in row["validation"])
            cells = [adapter, f"{row['kl_alpha']:.2f}", f"{trials} ({rows['validation_rows']})"]
            cells.append(f"{row['alpha']:.2f} (x{row['factor']:g})")
            cells += [_share(lora, lora), _share(row.get("heldout_before"), lora)]
            cells.append(_share(row.get("heldout_after"), lora))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _share(score: float | None, lora: float | None) -> str:
    if score is None:
        return "-"
    return f"{score:.3f}" + (f" ({score / lora:.0%})" if lora else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.compeft_alpha", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--tasks", default=",".join(TASK_NAMES), help="comma-separated (default: all)")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)), help="(default: %(default)s)")
    parser.add_argument("--factors", default=",".join(f"{f:g}" for f in FACTORS), help="x the KL alpha")
    parser.add_argument(
        "--validation",
        type=int,
        default=VALIDATION,
        help="generated rows per task (beside the hand-written ones)",
    )
    parser.add_argument("--out", default="adapters", help="the adapter root to rewrite (default: adapters)")
    parser.add_argument("--threads", type=int, default=None, help="the server's threads (default: its own)")
    parser.add_argument(
        "--no-heldout", action="store_true", help="choose only; do not score the held-out set"
    )
    parser.add_argument("--report", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    names = tuple(name.strip() for name in args.tasks.split(",") if name.strip())
    for name in names:
        get_task(name)
    try:
        densities = tuple(float(d) for d in args.densities.split(","))
        factors = tuple(float(f) for f in args.factors.split(","))
    except ValueError:
        parser.error("--densities and --factors take comma-separated numbers")
    if not factors or any(not (math.isfinite(f) and f > 0) for f in factors):
        parser.error("--factors: positive numbers")
    if args.validation < 0:
        parser.error("--validation: 0 or more rows")
    options = Options(
        names, densities, factors, args.validation, Path(args.out), args.threads, not args.no_heldout
    )
    report = tune(options)
    print(markdown(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
