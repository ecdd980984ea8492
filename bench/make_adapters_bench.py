"""`loramux bench make-adapters`: N random, reproducible PEFT LoRA adapters for scaling runs.

    loramux bench make-adapters --count 1000 --rank 8 --targets q_proj,v_proj --out /tmp/adapters

writes DIR/<prefix>-0000 .. DIR/<prefix>-0999, each a PEFT LoRA directory that PEFT's
`PeftModel.from_pretrained` and loramux's adapter store both load: `adapter_config.json` (the
fields PEFT's `save_pretrained` writes that decide what the adapter computes) and
`adapter_model.safetensors` with PEFT's key names
`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A|B}.weight`, A [rank, in] and
B [out, rank]. Point `loramux serve --adapter-root DIR` at them.

Shapes come from the base model's config.json alone: no weights are read, and torch is imported
only without --model (or with a .gguf), to find the model `loramux serve` runs and, the first
time, convert it from its GGUF as `serve` does.

The values, adapter i of seed S drawn from numpy's generator seeded with the pair (S, i), so
every (seed, index) pair is its own stream and a rerun writes byte-identical files:
    A [rank, in]:  uniform, mean 0, standard deviation 1 / sqrt(in)
    B [out, rank]: uniform, mean 0, standard deviation strength / (scale * sqrt(rank)),
                   scale = alpha / rank (PEFT's)
Uniform rather than normal because numpy draws it five times faster (1,000 all-linear adapters
are gigabytes of draws) and only the variance matters below; PEFT initialises A uniform too.
For an input x of `in` entries, A x has `rank` entries of about rms(x) each, so the adapter's
delta scale * B A x has entries of about strength * rms(x), whatever the rank and alpha: rank
and alpha change the file, not how hard the adapter pushes. SmolLM2-135M's projections map their
input to 2.5-8 x rms(x) (median rms(Wx) / rms(x): q 6.4, v 2.6, o 3.9, up 4.5, down 7.8), so the
default strength 0.1 makes the delta about 1-4 % of the base projection's output. Measured there
(4 chat prompts, rank 8, PEFT): q_proj,v_proj moves a logit by up to ~3.9, KL(base || adapted)
0.023 nats a token, 92 % of top-1 tokens unchanged (two adapters agree on 88 %); all-linear
0.035 nats, 96 %; greedy answers stay right. Every adapter so changes the output measurably and
differently from every other (a canary check can tell them apart) without wrecking the text.
Both A and B are nonzero (PEFT starts B at zero, an adapter that would change nothing).

Each adapter is written into a hidden staging directory beside its destination and renamed into
place, so an interrupted run leaves no half adapter (and adapter roots skip hidden names).
This module knows the PEFT LoRA layout and Llama projection shapes; it knows no engine or
adapter store (the tests check that the store accepts what it writes), and of the server only
its default --max-rank, to say how to serve the adapters.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from server.config import AdapterConfig  # the server's default --max-rank (a torch-free module)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README_FILE = "README.md"
# Llama-family projections in PEFT's module order, with the decoder block that holds each.
BLOCKS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every projection above
DTYPES = {"float16": np.float16, "float32": np.float32}
DEFAULT_STRENGTH = 0.1  # see the module doc for what it does on SmolLM2
PROGRESS_FROM = 20  # adapters; fewer finish before a bar would tell anything
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")  # adapter names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, required=True, help="how many adapters to write")
    parser.add_argument("--out", required=True, help="directory to write them into (an adapter root)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    parser.add_argument(
        "--targets",
        default="q_proj,v_proj",
        help=f"comma-separated projections ({', '.join(BLOCKS)}) or {ALL_LINEAR} (default q_proj,v_proj)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="base model: a Hugging Face directory (only its config.json is read) or a .gguf; "
        "default: the model `loramux serve` runs",
    )
    parser.add_argument("--seed", type=int, default=0, help="adapter i is drawn from the stream (seed, i)")
    parser.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2 * rank)")
    parser.add_argument(
        "--strength",
        type=float,
        default=DEFAULT_STRENGTH,
        help=f"each module's delta, as a fraction of its input's rms (default {DEFAULT_STRENGTH})",
    )
    parser.add_argument("--prefix", default="adapter", help="adapter i is named <prefix>-<i:04d>")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float16", help="of the saved factors")
    parser.add_argument(
        "--force", action="store_true", help="write into a non-empty --out, replacing same-named adapters"
    )


@dataclass(frozen=True)
class AdapterPlan:
    """What every adapter of one run holds; `index` and `seed` alone tell two adapters apart.

    features: target projection -> (in_features, out_features), in PEFT's module order.
    """

    base_model: str  # written as base_model_name_or_path
    num_layers: int
    features: dict[str, tuple[int, int]]
    rank: int
    alpha: float
    strength: float
    dtype: str
    seed: int
    prefix: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank  # PEFT's scaling without rsLoRA

    @property
    def nbytes(self) -> int:
        """The tensor bytes of one adapter (the safetensors header adds a few KiB)."""
        per_layer = sum(self.rank * (d_in + d_out) for d_in, d_out in self.features.values())
        return self.num_layers * per_layer * np.dtype(DTYPES[self.dtype]).itemsize

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:04d}"


@dataclass(frozen=True)
class Written:
    count: int
    bytes_each: int
    total_bytes: int
    seconds: float


# ---- the base model -----------------------------------------------------------------------------


def base_model_config(model: str | None) -> tuple[str, dict[str, Any]]:
    """(base_model_name_or_path, config.json) for --model; converts a GGUF once, as `serve` does."""
    if model is None or model.endswith(".gguf"):
        from server.model.loader import resolve_model_dir  # imports torch: only for the GGUF case

        directory = resolve_model_dir(model)[1]
    else:
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise ValueError(f"--model {model!r}: no such directory or .gguf file")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {model!r}: no config.json; expected a Hugging Face checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path}: cannot read it as JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    return str(directory.resolve()), config


def projection_features(config: dict[str, Any]) -> tuple[int, dict[str, tuple[int, int]]]:
    """(num_layers, projection -> (in, out)) of a Llama-family config, as server/model/arch.py reads it."""
    try:
        hidden = int(config["hidden_size"])
        intermediate = int(config["intermediate_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        num_layers = int(config["num_hidden_layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(
            f"the base model's config.json lacks a usable {exc}; is it a Llama-family model?"
        ) from None
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    features = {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }
    return num_layers, features


# ---- checking the flags -------------------------------------------------------------------------


def parse_targets(text: str) -> tuple[str, ...]:
    """--targets as projections in PEFT's module order; unknown names are an error naming the known ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == [ALL_LINEAR]:
        return tuple(BLOCKS)
    unknown = [name for name in names if name not in BLOCKS]
    if unknown or not names:
        what = f"unknown target module {unknown[0]!r}" if unknown else "no target modules"
        raise ValueError(
            f"--targets: {what}; use a comma-separated subset of {','.join(BLOCKS)} or {ALL_LINEAR}"
        )
    return tuple(name for name in BLOCKS if name in names)


def check_numbers(args: argparse.Namespace) -> None:
    """The flags that need no model, checked before the model is looked up."""
    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.alpha is not None and not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--alpha must be a positive number, got {args.alpha}")
    if not (math.isfinite(args.strength) and args.strength > 0):
        raise ValueError(f"--strength must be a positive number, got {args.strength}")
    if not args.prefix or not args.prefix[0].isalnum() or not set(args.prefix) <= NAME_CHARS:
        raise ValueError(
            f"--prefix {args.prefix!r}: adapter names use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if len(args.prefix) + 1 + max(4, len(str(args.count - 1))) > 128:
        raise ValueError("--prefix is too long: adapter names are at most 128 characters")


def plan_from_args(args: argparse.Namespace) -> AdapterPlan:
    """Every flag checked once, into the plan the writer trusts (ValueError says what to fix)."""
    check_numbers(args)
    targets = parse_targets(args.targets)
    base_model, config = base_model_config(args.model)
    num_layers, features = projection_features(config)
    return AdapterPlan(
        base_model=base_model,
        num_layers=num_layers,
        features={name: features[name] for name in targets},
        rank=args.rank,
        alpha=float(args.alpha) if args.alpha is not None else 2.0 * args.rank,
        strength=args.strength,
        dtype=args.dtype,
        seed=args.seed,
        prefix=args.prefix,
    )


# ---- one adapter --------------------------------------------------------------------------------


def adapter_config(plan: AdapterPlan) -> dict[str, Any]:
    """adapter_config.json: the LoraConfig fields PEFT's save_pretrained writes that decide the forward."""
    alpha = int(plan.alpha) if plan.alpha.is_integer() else plan.alpha  # 16, not 16.0, as PEFT writes
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": plan.base_model,
        "r": plan.rank,
        "lora_alpha": alpha,
        "target_modules": list(plan.features),
        "rank_pattern": {},
        "alpha_pattern": {},
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": False,
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def adapter_tensors(plan: AdapterPlan, index: int) -> dict[str, np.ndarray]:
    """Adapter `index`'s factors under PEFT's key names: A [rank, in], B [out, rank] (see the module doc)."""
    rng = np.random.default_rng([plan.seed, index])
    dtype = DTYPES[plan.dtype]
    b_std = plan.strength / (plan.scale * math.sqrt(plan.rank))
    tensors: dict[str, np.ndarray] = {}
    for layer in range(plan.num_layers):
        for projection, (d_in, d_out) in plan.features.items():
            key = f"base_model.model.model.layers.{layer}.{BLOCKS[projection]}.{projection}"
            a = _uniform(rng, (plan.rank, d_in), 1 / math.sqrt(d_in))
            b = _uniform(rng, (d_out, plan.rank), b_std)
            tensors[f"{key}.lora_A.weight"] = a.astype(dtype, copy=False)
            tensors[f"{key}.lora_B.weight"] = b.astype(dtype, copy=False)
    return tensors


def _uniform(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """float32 draws from U(-sqrt(3) std, sqrt(3) std): mean 0, standard deviation `std`, never 0 in bulk."""
    values = rng.random(shape, dtype=np.float32)  # [0, 1)
    values -= np.float32(0.5)
    values *= np.float32(2 * math.sqrt(3) * std)
    return values


def readme(plan: AdapterPlan, index: int) -> str:
    return (
        f"# {plan.name(index)}\n\n"
        "A random LoRA adapter written by `loramux bench make-adapters` for scaling runs: not trained,\n"
        "it means nothing. Reproduce it with "
        f"`--seed {plan.seed} --rank {plan.rank} --alpha {plan.alpha:g} --strength {plan.strength:g} "
        f"--targets {','.join(plan.features)} --dtype {plan.dtype}` (index {index}).\n\n"
        f"Base model: {plan.base_model}\n"
    )


def write_adapter(plan: AdapterPlan, out: Path, index: int) -> int:
    """Write adapter `index` into `out` (replacing one of its name), atomically; returns its bytes on disk."""
    destination = out / plan.name(index)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}-", dir=out))  # hidden: roots skip it
    try:
        save_file(adapter_tensors(plan, index), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(adapter_config(plan), indent=2) + "\n")
        (staging / README_FILE).write_text(readme(plan, index))
        nbytes = sum(path.stat().st_size for path in staging.iterdir())
        if destination.exists() or destination.is_symlink():
            _remove(destination)  # only with --force (main refuses a non-empty --out otherwise)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return nbytes


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


# ---- the run ------------------------------------------------------------------------------------


def prepare_out(out: Path, plan: AdapterPlan, count: int, force: bool) -> None:
    """Create `out`, or refuse a non-empty one (without --force) or one without room for the adapters."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new directory or pass --force to write into it")
    out.mkdir(parents=True, exist_ok=True)
    needed, free = count * plan.nbytes, shutil.disk_usage(out).free
    if needed > free:
        raise ValueError(
            f"--out {out}: {count} adapters need about {needed >> 20} MiB, only {free >> 20} MiB are free"
        )


def write_adapters(plan: AdapterPlan, out: Path, count: int, progress: bool = False) -> Written:
    """Adapters 0 .. count-1 of `plan` into `out` (which prepare_out has checked)."""
    from tqdm import tqdm

    start = time.perf_counter()
    sizes = []
    # disable=None: a bar only when stderr is a terminal
    indices = tqdm(range(count), desc="adapters", unit="adapter", disable=None if progress else True)
    for index in indices:
        sizes.append(write_adapter(plan, out, index))
    return Written(count, sizes[0], sum(sizes), time.perf_counter() - start)


def main(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
        out = Path(args.out).expanduser()
        prepare_out(out, plan, args.count, args.force)
    except ValueError as exc:
        print(f"loramux bench make-adapters: error: {exc}", file=sys.stderr)
        return 2
    written = write_adapters(plan, out, args.count, progress=args.count >= PROGRESS_FROM)
    ours = {plan.name(index) for index in range(args.count)}
    others = sorted(p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith("."))
    last = plan.name(args.count - 1)
    print(
        f"wrote {written.count} adapters ({plan.name(0)} .. {last}) to {out} in {written.seconds:.2f} s: "
        f"{written.bytes_each / 2**20:.2f} MiB each, {written.total_bytes / 2**20:.1f} MiB in all "
        f"(rank {plan.rank}, alpha {plan.alpha:g}, {','.join(plan.features)} x {plan.num_layers} layers, "
        f"{plan.dtype}, seed {plan.seed}, strength {plan.strength:g}; base {plan.base_model})"
    )
    if others:
        print(
            f"note: {out} also holds {len(others)} other entries (e.g. {others[0]}); a server over it serves those too"
        )
    max_rank = "" if plan.rank <= AdapterConfig().max_rank else f" --max-rank {plan.rank}"
    print(f"serve them: loramux serve --adapter-root {out}{max_rank}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
