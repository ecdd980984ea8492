"""The training loop: a LoRA or MoS adapter over the base model in fp32 on CPU, saved as loramux serves it.

`train(config)` does, in order: (1) check the output directory can be written, (2) read and
check the rows (data.py), (3) load the tokenizer and tokenize them with the server's template,
(4) load the base model (transformers, fp32) and wrap it with PEFT's `get_peft_model`
(`--method lora`) or our Mixture-of-Shards layers (`--method mos`, training/mos.py),
(5) run `config.steps` AdamW steps on right-padded batches drawn from a seeded shuffle (linear
warmup, cosine decay to zero, gradient clipping), (6) save the adapter in `config.dtype` (a PEFT
directory with `save_pretrained`, or the `mos` format) plus `training.json` (TRAINING_FILE).

Deterministic: the same data, config and seed give byte-identical adapter files (on one machine
and thread count). This module knows nothing of flags or the serving engine.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.config import TrainConfig, TrainingError
from training.data import IGNORE_INDEX, Example, read_rows, tokenize_rows
from training.mos import MosAdapterModule

if TYPE_CHECKING:
    import torch

TRAINING_FILE = "training.json"
FINAL_LOSS_STEPS = 10  # final_loss averages the last this many steps (batches differ step to step)


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int
    losses: tuple[float, ...]  # one per step
    seconds: float  # the steps only, not loading
    rows: int
    threads: int

    @property
    def final_loss(self) -> float:
        last = self.losses[-FINAL_LOSS_STEPS:]
        return sum(last) / len(last)


def train(config: TrainConfig) -> TrainResult:
    """Train and save one adapter; TrainingError (or ModelNotFound, an OSError) on what users can fix."""
    # 1) fail before any work if the result could not be written
    created = check_out_dir(config.out)
    try:
        return _train(config)
    except BaseException:
        if created and not any(config.out.iterdir()):  # a failed run leaves no empty --out behind
            config.out.rmdir()
        raise


def _train(config: TrainConfig) -> TrainResult:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from server.model.loader import eos_token_ids, resolve_model_dir

    # 2) 3) rows -> ids, through the server's chat template
    rows = read_rows(config.data)
    name, directory = resolve_model_dir(config.model, config.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    end_of_turn = eos_token_ids(directory, AutoConfig.from_pretrained(directory), tokenizer)
    examples = tokenize_rows(tokenizer, rows, end_of_turn, config.max_length, config.data)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(end_of_turn)

    with _deterministic(), _threads(config.threads), torch.random.fork_rng(devices=[]):
        # 4) the LoRA's A is initialised from torch's global generator: seed it first
        torch.manual_seed(config.seed)
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        # PEFT writes this name into adapter_config.json and its model card: the model's name,
        # not the local (cache) directory it was read from
        base.name_or_path = base.config.name_or_path = name
        if config.method == "mos":
            mos = MosAdapterModule(base, config, _projections(base, config))
            params = mos.parameters()
        else:
            model = _with_lora(base, config)
            params = [param for param in model.parameters() if param.requires_grad]
        # 5)
        started = time.perf_counter()
        losses = _run_steps(base, params, examples, pad_id, config)
        seconds = time.perf_counter() - started
        threads = torch.get_num_threads()
    # 6)
    result = TrainResult(config.out, config.steps, tuple(losses), seconds, len(rows), threads)
    if config.method == "mos":
        mos.save(config.out, name, config.dtype)
        parameters = mos.num_parameters
    else:
        save_adapter(model, config)
        parameters = sum(param.numel() for param in params)
    write_training_json(result, config, name, examples, parameters)
    return result


def _projections(base: Any, config: TrainConfig) -> list[str]:
    """The projections --targets names, in PROJECTIONS order for all-linear."""
    from adapters_store.spec import PROJECTIONS

    targets = config.target_modules
    if isinstance(targets, list):
        return targets
    layer = base.model.layers[0]
    return [p for p in PROJECTIONS if hasattr(layer.self_attn, p) or hasattr(layer.mlp, p)]


def check_out_dir(out: Path) -> bool:
    """Create `out` if needed (its parent must exist) and make sure files can be written in it;
    True if it was created."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; give a directory for the adapter")
    created = not out.exists()
    if created:
        if not out.parent.is_dir():
            raise TrainingError(
                f"--out {out}: the parent directory {out.parent} does not exist; create it first"
            )
        try:
            out.mkdir()
        except OSError as exc:
            raise TrainingError(f"--out {out}: cannot create it ({exc.strerror or exc})") from None
    try:
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise TrainingError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None
    return created


def _with_lora(base: Any, config: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    # PEFT types lora_alpha as int (and writes 16, not 16.0, for it); a fractional alpha works too
    alpha: Any = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=alpha,
        target_modules=config.target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(base, lora)
    except ValueError as exc:  # e.g. a target module this architecture does not have
        raise TrainingError(f"PEFT refused --targets {config.targets}: {exc}") from None


def _run_steps(
    base: Any, params: list[Any], examples: Sequence[Example], pad_id: int, config: TrainConfig
) -> list[float]:
    """`config.steps` AdamW steps on `params` (the adapter's, inside `base`); the loss of each step."""
    import torch
    from tqdm import tqdm

    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    batches = batch_order(len(examples), config.batch_size, random.Random(config.seed))
    base.train()
    losses = []
    with tqdm(total=config.steps, desc="train", unit="step", dynamic_ncols=True) as bar:
        for _ in range(config.steps):
            input_ids, attention_mask, labels = collate([examples[i] for i in next(batches)], pad_id)
            loss = answer_loss(base, input_ids, attention_mask, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
            bar.update()
    base.eval()
    return losses


def answer_loss(
    base: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy over the labelled (answer) tokens of the batch, as transformers' causal-LM loss.

    The vocabulary projection runs only where a label is: on SmolLM2 (49k tokens) the full logits
    cost a fifth of the step. Llama-family heads only (no logit scaling or soft-capping).
    """
    import torch.nn.functional as F

    decoder = base.get_decoder()
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = labels[:, 1:]  # [batch, length - 1]: position t predicts token t + 1
    keep = targets != IGNORE_INDEX
    logits = base.get_output_embeddings()(hidden[:, :-1][keep])  # [answer tokens, vocab]
    return F.cross_entropy(logits.float(), targets[keep])


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning rate of `step` (0-based) over config.lr: linear warmup, then cosine decay to 0."""
    warmup = config.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def batch_order(num_examples: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of example indices: each epoch a fresh shuffle, batches running across epochs."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            epoch = list(range(num_examples))
            rng.shuffle(epoch)
            pending.extend(epoch)
        yield pending[:batch_size]
        pending = pending[batch_size:]


def collate(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, each [batch, longest] int64."""
    import torch

    length = max(len(example.input_ids) for example in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return input_ids, attention_mask, labels


@contextmanager
def _deterministic() -> Iterator[None]:
    """torch's deterministic algorithms for the duration (cheap on CPU), restored afterwards."""
    import torch

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the duration: `threads`, or as many as the server would use."""
    import torch

    from server.cpus import default_threads

    was = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads(os.environ))
    try:
        yield
    finally:
        torch.set_num_threads(was)


def save_adapter(model: Any, config: TrainConfig) -> None:
    """PEFT's `save_pretrained` (adapter_config.json + adapter_model.safetensors) in config.dtype."""
    import torch

    dtype = getattr(torch, config.dtype)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    try:
        # save_embedding_layers=False: no embeddings are trained, and "auto" would look the base
        # model's name up on the Hugging Face Hub
        model.save_pretrained(str(config.out), safe_serialization=True, save_embedding_layers=False)
        # the weights come out 0600 (written through a temporary file); give them the mode the
        # config got from the umask, so a server running as another user can read them too
        weights = config.out / "adapter_model.safetensors"
        weights.chmod((config.out / "adapter_config.json").stat().st_mode & 0o777)
    except OSError as exc:
        raise TrainingError(f"--out {config.out}: cannot save the adapter ({exc.strerror or exc})") from None


def write_training_json(
    result: TrainResult, config: TrainConfig, base_name: str, examples: Sequence[Example], parameters: int
) -> None:
    """training.json: what was trained on and how it went, for reports and reruns."""
    args = asdict(config)
    args.update(data=str(config.data), out=str(config.out), warmup_steps=config.warmup_steps)
    answer_tokens = sum(sum(label != IGNORE_INDEX for label in example.labels) for example in examples)
    summary = {
        "base_model": base_name,
        "rows": result.rows,
        "answer_tokens": answer_tokens,
        "steps": result.steps,
        "seed": config.seed,
        "method": config.method,
        "parameters": parameters,
        "initial_loss": round(result.losses[0], 6),
        "final_loss": round(result.final_loss, 6),
        "seconds": round(result.seconds, 3),
        "seconds_per_step": round(result.seconds / result.steps, 4),
        "threads": result.threads,
        "args": args,
        "losses": [round(loss, 6) for loss in result.losses],
    }
    path = config.out / TRAINING_FILE
    try:
        path.write_text(json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise TrainingError(
            f"--out {config.out}: cannot write {TRAINING_FILE} ({exc.strerror or exc})"
        ) from None
