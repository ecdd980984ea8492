"""`loramux compress`: compress a PEFT LoRA adapter with ComPEFT, pick alpha on the model, and report its fidelity.

`compress(config)` does, in order: (1) check DST can be written, (2) read the base model's config
and the source adapter (adapters_store's PEFT loader, against the model's projection sizes),
(3) compress it once (adapters_store.compeft), (4) load the base model (transformers, fp32) and
the prompts, rendered with the chat template the server applies (server.prompts.chat_prompt_ids),
(5) with `--alpha auto`, pick alpha on the calibration prompts, (6) measure the fidelity on the
report prompts, (7) save the directory with the chosen alpha and the figures in its config.

Fidelity compares next-token distributions with those of the uncompressed source adapter where an
adapter acts: at every position of the source adapter's own greedy answer to each prompt (up to
ANSWER_TOKENS tokens), the mean KL(source || compressed) in nats and the top-1 agreement. (Scoring
the prompt's own positions instead picked alphas that halved task scores: on the extract demo
adapter at density 0.1 it chose 5.8, exact match 0.40, where alpha 4 scores 0.83.)
Alpha only rescales the compressed delta (`scale * gamma**2 * S_B S_A`, gamma = alpha * sigma),
so every candidate reuses the same signs: a geometric grid, then a golden-section refinement in
log alpha around the best grid point. The adapters run as forward hooks on the transformers
model's projections, never through PEFT, so the same code applies dense and ternary factors.
This module knows nothing of flags (server/cli.py) or printing (server/compress_commands.py).
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import TrainingError

if TYPE_CHECKING:
    import torch

    from adapters_store import CompeftCodes, LoraAdapter

PROMPTS_FILE = "examples.jsonl"  # beside a demo adapter: {"prompt": ...} per line
MAX_CALIBRATION_PROMPTS = 8  # every alpha tried runs them all: keep --alpha auto to seconds
MAX_REPORT_PROMPTS = 16
MAX_PROMPT_TOKENS = 256
BATCH_PROMPTS = 8
ANSWER_TOKENS = 32  # of the source adapter's greedy answer, scored per prompt
ALPHA_GRID = tuple(2.0**step for step in range(-2, 6))  # 0.25 .. 32
REFINE_STEPS = 5
BUILTIN_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a hash table is in one paragraph.",
    "List three fruits that are red.",
    "How many days are there in a leap year?",
    "Translate 'good morning' into Spanish.",
    "Give me a short tip for writing clean code.",
    "What does a compiler do?",
    "Summarise the plot of Cinderella in two sentences.",
    "Name a planet with rings.",
    "Why is the sky blue?",
    "Suggest a name for a small bakery.",
)


class CompressError(TrainingError):
    """Something the user can fix (a flag, the source adapter, DST, the prompts); the message says what."""


@dataclass(frozen=True)
class CompressConfig:
    """One `loramux compress` run. alpha None = pick it on the calibration prompts (`--alpha auto`)."""

    source: Path
    out: Path
    density: float
    alpha: float | None = None
    model: str | None = None  # None = the server's default model
    cache_dir: str | None = None
    prompts: Path | None = None
    method: str = "compeft"
    factors: str = "svd"  # which factors of each B A are compressed (see compress_compeft)

    def __post_init__(self) -> None:
        if self.method != "compeft":
            raise CompressError(f"--method {self.method!r} is not supported; use compeft")
        if not (math.isfinite(self.density) and 0 < self.density <= 1):
            raise CompressError(f"--density must be in (0, 1], got {self.density}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise CompressError(f"--alpha must be a positive number or auto, got {self.alpha}")


@dataclass(frozen=True)
class Fidelity:
    top1_agreement: float  # fraction of positions whose most likely next token is the source's
    mean_kl: float  # KL(source || other) in nats, averaged over positions
    positions: int
    prompts: int

    def as_json(self) -> dict[str, float | int]:
        return {
            "top1_agreement": round(self.top1_agreement, 6),
            "mean_kl": round(self.mean_kl, 6),
            "positions": self.positions,
            "prompts": self.prompts,
        }


@dataclass(frozen=True)
class CompressResult:
    out: Path
    codes: CompeftCodes
    alpha_auto: bool
    alpha_trials: tuple[tuple[float, float], ...]  # (alpha, calibration KL) in the order tried
    fidelity: Fidelity  # the compressed adapter against the source, on the report prompts
    base_fidelity: Fidelity  # the base model alone against the source, for scale
    prompts_from: str
    source_bytes: int  # the source's weights file
    fp16_bytes: int  # the source's factors in float16
    compeft_bytes: int  # compeft_model.safetensors


def compress(config: CompressConfig) -> CompressResult:
    """Compress, evaluate and save one adapter; CompressError (or ModelNotFound) on what users can fix."""
    from adapters_store import AdapterError, compress_compeft, load_peft_lora, save_compeft
    from adapters_store.compeft import WEIGHTS_FILE
    from adapters_store.lineage import write_source
    from adapters_store.peft_lora import WEIGHTS_FILE as SOURCE_WEIGHTS
    from server.model.loader import resolve_model_dir

    # 1)
    created = _check_out_dir(config.out, config.source)
    try:
        # 2) 3)
        model_name, model_dir = resolve_model_dir(config.model, config.cache_dir)
        try:
            source = load_peft_lora(config.source, _spec(model_dir), "source", label=str(config.source))
        except AdapterError as exc:
            raise CompressError(f"SRC: {exc}") from None
        codes = compress_compeft(source, config.density, config.alpha or 1.0, factors=config.factors)
        # 4)
        calibration_prompts, report_prompts, prompts_from = _prompts(config)
        probe = DeltaProbe(model_dir)
        dense = dense_terms(source)
        report = probe.answered(report_prompts, dense)
        # 5)
        trials: list[tuple[float, float]] = []
        if config.alpha is None:
            calibration = probe.answered(calibration_prompts, dense)
            reference = probe.log_probs(calibration, dense)
            codes = codes.with_alpha(search_alpha(probe, calibration, reference, codes, trials))
        # 6)
        reference = probe.log_probs(report, dense)
        fidelity = compare(reference, probe.log_probs(report, ternary_terms(codes)), len(report.sequences))
        base = compare(reference, probe.log_probs(report, {}), len(report.sequences))
        # 7)
        extra = {
            "alpha_search": {
                "mode": "auto" if config.alpha is None else "fixed",
                "calibration_prompts": len(calibration_prompts) if config.alpha is None else 0,
                "scored": f"the source adapter's greedy answers (up to {ANSWER_TOKENS} tokens)",
                "trials": [[round(a, 6), round(kl, 6)] for a, kl in trials],
            },
            "fidelity": {
                **fidelity.as_json(),
                "base_model_alone": base.as_json(),
                "prompts_from": prompts_from,
            },
        }
        save_compeft(codes, config.out, base_model=_base_model_name(config.source, model_name), extra=extra)
        write_source(config.out, source)
    except BaseException:
        if created:
            shutil.rmtree(config.out, ignore_errors=True)
        raise
    return CompressResult(
        out=config.out,
        codes=codes,
        alpha_auto=config.alpha is None,
        alpha_trials=tuple(trials),
        fidelity=fidelity,
        base_fidelity=base,
        prompts_from=prompts_from,
        source_bytes=(config.source / SOURCE_WEIGHTS).stat().st_size,
        fp16_bytes=2 * codes.total_elements,
        compeft_bytes=(config.out / WEIGHTS_FILE).stat().st_size,
    )


# -- alpha and fidelity ----------------------------------------------------------------------

Terms = Mapping[tuple[int, str], tuple["torch.Tensor", "torch.Tensor", float]]  # A, B, coefficient


def dense_terms(adapter: LoraAdapter) -> Terms:
    return {key: (w.A, w.B, w.scale) for key, w in adapter.lora_weights().items()}


def ternary_terms(codes: CompeftCodes) -> Terms:
    """Unit signs with `scale * gamma**2` as the coefficient: a new alpha changes only the coefficient."""
    import torch

    return {
        key: (f.sign_A.to(torch.float32), f.sign_B.to(torch.float32), f.scale * codes.gamma**2)
        for key, f in codes.ternary().items()
    }


def rescaled(terms: Terms, factor: float) -> Terms:
    return {key: (a, b, coefficient * factor) for key, (a, b, coefficient) in terms.items()}


def search_alpha(
    probe: DeltaProbe,
    prompts: Answered,
    reference: torch.Tensor,
    codes: CompeftCodes,
    trials: list[tuple[float, float]],
) -> float:
    """The alpha of least mean KL against `reference` on `prompts`; every (alpha, KL) tried goes to `trials`."""
    unit = ternary_terms(codes.with_alpha(1.0))  # coefficient scale * sigma**2: alpha**2 multiplies it

    def kl_at(alpha: float) -> float:
        kl = compare(
            reference, probe.log_probs(prompts, rescaled(unit, alpha**2)), len(prompts.sequences)
        ).mean_kl
        trials.append((alpha, kl))
        return kl

    grid = [kl_at(alpha) for alpha in ALPHA_GRID]
    best = min(range(len(grid)), key=grid.__getitem__)
    low = math.log(ALPHA_GRID[max(best - 1, 0)])
    high = math.log(ALPHA_GRID[min(best + 1, len(grid) - 1)])
    ratio = (math.sqrt(5) - 1) / 2
    # golden-section search in log alpha over the best grid point's neighbours
    c, d = high - ratio * (high - low), low + ratio * (high - low)
    kl_c, kl_d = kl_at(math.exp(c)), kl_at(math.exp(d))
    for _ in range(REFINE_STEPS - 2):
        if kl_c < kl_d:
            high, d, kl_d = d, c, kl_c
            c = high - ratio * (high - low)
            kl_c = kl_at(math.exp(c))
        else:
            low, c, kl_c = c, d, kl_d
            d = low + ratio * (high - low)
            kl_d = kl_at(math.exp(d))
    return min(trials, key=lambda trial: trial[1])[0]


def compare(reference: torch.Tensor, other: torch.Tensor, prompts: int) -> Fidelity:
    """Top-1 agreement and mean KL(reference || other) of two [positions, vocab] log-prob tensors."""
    kl = (reference.exp() * (reference - other)).sum(-1)  # [positions]
    agree = reference.argmax(-1) == other.argmax(-1)
    return Fidelity(float(agree.float().mean()), float(kl.mean()), int(kl.numel()), prompts)


@dataclass(frozen=True)
class Answered:
    """Prompts followed by an answer: the positions first_scored[i] .. len(sequences[i]) - 2 of each
    predict its answer's tokens, and are the ones scored."""

    sequences: tuple[list[int], ...]
    first_scored: tuple[int, ...]


class DeltaProbe:
    """The base model (transformers, fp32, eval) whose projections add `coefficient * (x A^T) B^T` per term."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._terms: Terms = {}
        for layer, decoder_layer in enumerate(self.model.model.layers):
            for block_name in ("self_attn", "mlp"):
                for projection, module in getattr(decoder_layer, block_name).named_children():
                    if isinstance(module, torch.nn.Linear):
                        module.register_forward_hook(self._hook((layer, projection)))

    def _hook(self, key: tuple[int, str]) -> Any:
        def add_term(module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            term = self._terms.get(key)
            if term is None:
                return output
            a, b, coefficient = term
            return output + coefficient * ((inputs[0] @ a.T) @ b.T)

        return add_term

    def answered(self, prompts: Sequence[Sequence[int]], terms: Terms) -> Answered:
        """Each prompt followed by the greedy answer (up to ANSWER_TOKENS) the model gives with `terms`."""
        import torch

        sequences = []
        with self._applied(terms), torch.inference_mode():
            for ids in prompts:
                out = self.model.generate(
                    input_ids=torch.tensor([list(ids)]),
                    attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                    max_new_tokens=ANSWER_TOKENS,
                    do_sample=False,
                    pad_token_id=self.model.generation_config.eos_token_id,
                )
                sequences.append(out[0].tolist())
        return Answered(tuple(sequences), tuple(len(ids) - 1 for ids in prompts))

    def log_probs(self, answered: Answered, terms: Terms) -> torch.Tensor:
        """Next-token log-probs at the positions that predict each answer's tokens, [positions, vocab],
        with `terms` applied."""
        import torch

        rows = []
        with self._applied(terms), torch.inference_mode():
            for start in range(0, len(answered.sequences), BATCH_PROMPTS):
                batch = answered.sequences[start : start + BATCH_PROMPTS]
                firsts = answered.first_scored[start : start + BATCH_PROMPTS]
                longest = max(len(ids) for ids in batch)
                input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
                mask = torch.zeros((len(batch), longest), dtype=torch.long)
                scored = torch.zeros((len(batch), longest), dtype=torch.bool)
                for row, (ids, first) in enumerate(zip(batch, firsts, strict=True)):
                    input_ids[row, : len(ids)] = torch.tensor(ids)  # right padding: causal attention
                    mask[row, : len(ids)] = 1  # leaves the real positions alone
                    scored[row, first : len(ids) - 1] = True
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                rows.append(torch.log_softmax(logits[scored].float(), dim=-1))
        return torch.cat(rows)

    @contextmanager
    def _applied(self, terms: Terms) -> Iterator[None]:
        self._terms = terms
        try:
            yield
        finally:
            self._terms = {}


# -- inputs ----------------------------------------------------------------------------------


def _spec(model_dir: Path) -> Any:
    from transformers import AutoConfig

    from server.model.arch import ModelArch

    arch = ModelArch.from_hf_config(AutoConfig.from_pretrained(model_dir))
    # compression takes any rank; a server checks its own --max-rank at load
    return arch.adapter_spec(max_rank=1 << 16)


def _prompts(config: CompressConfig) -> tuple[list[list[int]], list[list[int]], str]:
    """(calibration ids, report ids, where they came from): halves of --prompts, SRC/examples.jsonl or
    the built-in prompts, each rendered as one user message with the chat template."""
    from transformers import AutoTokenizer

    from server.engine.request import InvalidRequest
    from server.model.loader import resolve_model_dir
    from server.prompts import chat_prompt_ids

    if config.prompts is not None:
        texts, origin = read_prompts(config.prompts), str(config.prompts)
    elif (config.source / PROMPTS_FILE).is_file():
        texts, origin = read_prompts(config.source / PROMPTS_FILE), str(config.source / PROMPTS_FILE)
    else:
        texts, origin = list(BUILTIN_PROMPTS), "built-in prompts"
    if len(texts) < 2:
        raise CompressError(
            f"{origin} holds {len(texts)} prompt; give at least 2 (calibration and report halves)"
        )
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(config.model, config.cache_dir)[1])
    try:
        ids = [list(chat_prompt_ids(tokenizer, [("user", text)]))[:MAX_PROMPT_TOKENS] for text in texts]
    except InvalidRequest as exc:
        raise CompressError(f"{origin}: {exc}") from None
    half = len(ids) // 2
    return ids[:half][:MAX_CALIBRATION_PROMPTS], ids[half:][:MAX_REPORT_PROMPTS], origin


def read_prompts(path: Path) -> list[str]:
    """The "prompt" of every line of a JSONL file; CompressError names the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise CompressError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CompressError(f"--prompts {path}: cannot read it ({exc})") from None
    prompts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CompressError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise CompressError(f'{path} line {number}: expected {{"prompt": "<text>"}}')
        prompts.append(prompt)
    return prompts


def _base_model_name(source: Path, model_name: str) -> str:
    """The source adapter's base_model_name_or_path, else the model compressed against."""
    try:
        name = json.loads((source / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        name = None
    return name if isinstance(name, str) and name else model_name


def _check_out_dir(out: Path, source: Path) -> bool:
    """DST must be new or an empty directory (never SRC); True if it was created here."""
    if not source.is_dir():
        raise CompressError(f"SRC {source}: no such directory; give a PEFT LoRA adapter directory")
    if out.exists():
        if not out.is_dir():
            raise CompressError(f"DST {out} is a file; give a new directory for the compressed adapter")
        if any(out.iterdir()):
            raise CompressError(f"DST {out} is not empty; give a new directory for the compressed adapter")
        return False
    if not out.parent.is_dir():
        raise CompressError(f"DST {out}: the parent directory {out.parent} does not exist; create it first")
    try:
        out.mkdir()
    except OSError as exc:
        raise CompressError(f"DST {out}: cannot create it ({exc.strerror or exc})") from None
    return True
