"""The router: which adapter(s) an `auto` request runs with, learned from examples or from weights.

`Router.route(token_ids)` reads the prompt with the base model's first layers (features.py) and
ranks the routable adapters:
- adapters with example prompts by the trained selector (selector.py): calibrated probabilities,
  and an in-domain test against each adapter's examples;
- adapters without examples by their weights (prototypes.py, Arrow): a softmax of the prompt's
  standardized scores at `arrow_temperature`; this reads every layer (`prototype_layers` 0), as
  much as a prefill of the prompt, so it is paid only while such adapters are routable.
When both kinds exist, the weights decide between each example-less adapter and the group of
adapters with examples (the group scores as its best member), and the selector divides the
group's share among its members.
Versions of one adapter (a compressed or exported copy beside its original: variants.py) are one
candidate, the original. The best candidate serves the request unless its score is below
`threshold` or the prompt is out of its examples' domain: then the base model does (`fallback`). With `top_k > 1` the request runs
the mixture of the top candidates, weighted by their renormalized scores.

`learn(adapter, prompts)` (RegisterExamples, LoadAdapter with example prompts) and `reconcile()`
(at start: every adapter's `examples.jsonl`, adapters gone or changed) update the tables under one
lock and swap them in; `route` reads whichever tables are current and never waits for learning.
The tables are saved after every change (state.py) and read back at start.

It knows the model (through FeatureReader), the tokenizer's chat template and the adapters'
directories and weights (through an AdapterSource); nothing of gRPC, HTTP or the engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import torch

from adapters_store import AdapterError, AdapterStore, LoadedAdapter
from server.config import RouterConfig
from server.prompts import chat_prompt_ids
from server.router.decision import Candidate, RouteDecision
from server.router.examples import Examples, ExamplesError, check_prompts, read_examples
from server.router.features import FeatureReader, Taps
from server.router.prototypes import (
    REFERENCE_PROMPTS,
    AdapterPrototypes,
    adapter_vectors,
    arrow_scores,
    calibrated,
)
from server.router.selector import LearnReport, Selector
from server.router.state import TableFiles
from server.router.tables import Known, Tables
from server.router.variants import Variants

log = logging.getLogger(__name__)

NO_PROTOTYPES = AdapterPrototypes({}, {}, {})  # an adapter whose weights were refused: scores 0


class AdapterSource(Protocol):
    def directories(self) -> Mapping[str, Path]:
        """Every adapter the server can serve, by name, with its directory."""

    def adapter(self, name: str) -> LoadedAdapter:
        """The adapter's weights (raises AdapterError when it is refused)."""

    def refused(self, name: str) -> bool:
        """Whether the adapter's last load was refused (its files unchanged since, as far as known)."""


@dataclass(frozen=True)
class ReconcileReport:
    learned: tuple[str, ...]
    forgotten: tuple[str, ...]
    weight_only: tuple[str, ...]
    refused: tuple[tuple[str, str], ...]  # (adapter, why)
    seconds: float
    stopped: bool = False  # cut short by `Router.stop`: nothing was published
    versions: tuple[tuple[str, str], ...] = ()  # (version, the adapter it is routed as), all of them


_STOPPED = ReconcileReport((), (), (), (), 0.0, stopped=True)


class Router:
    def __init__(
        self,
        model_name: str,
        reader: FeatureReader,
        tokenizer: Any,
        source: AdapterSource,
        config: RouterConfig,
    ) -> None:
        self.model_name = model_name
        self.reader = reader
        self.tokenizer = tokenizer  # used under self._lock only
        self.source = source
        self.config = config
        self._lock = threading.Lock()  # one learner at a time; `route` never takes it
        self._stopping = threading.Event()
        self.tables = Tables(Selector(reader.dim))
        self._variants = Variants()
        self._told_versions: set[tuple[str, str]] = set()  # logged once each
        self._files = TableFiles(Path(config.state_path)) if config.state_path is not None else None

    def restore(self) -> bool:
        """Read the tables saved at `config.state_path` back (at start, before `reconcile`); False
        when there are none to reuse (none saved, unreadable, another model or setting)."""
        saved = self._files.load(self.state_key(), self.reader.dim) if self._files is not None else None
        if saved is not None:
            self.tables = saved
        return saved is not None

    def stop(self) -> None:
        """The server is shutting down: a reconcile under way returns after the adapter it is on,
        publishing nothing, and later ones do nothing (learning would outlive the process)."""
        self._stopping.set()

    # -- routing ---------------------------------------------------------------------------------

    def route(self, token_ids: Sequence[int]) -> RouteDecision:
        started = time.perf_counter()
        tables, config = self.tables, self.config
        allowed = [config.allows(c) for c in tables.selector.classes]
        with_examples = [c for c, ok in zip(tables.selector.classes, allowed, strict=True) if ok]
        weight_only = [n for n in tables.prototypes if n not in tables.selector.classes and config.allows(n)]
        if not with_examples and not weight_only:
            return RouteDecision((), True, "no routable adapter", time.perf_counter() - started)
        reading = self.reader.read(token_ids, self._prototype_layers if weight_only else 0)
        scores: dict[str, tuple[float, str]] = {}
        in_domain: dict[str, bool] = {}
        group = 1.0  # the share of the adapters with examples
        if weight_only:
            members = weight_only + with_examples
            raw = arrow_scores([tables.prototypes.get(n, NO_PROTOTYPES) for n in members], reading.taps)
            if with_examples:  # the example group scores as its best member
                raw = torch.cat([raw[: len(weight_only)], raw[len(weight_only) :].max().unsqueeze(0)])
            shares = torch.softmax(raw / config.arrow_temperature, 0)
            for name, share in zip(weight_only, shares.tolist(), strict=False):
                scores[name] = (share, "weights")
            group = float(shares[-1]) if with_examples else 0.0
        if with_examples:
            selected = tables.selector.scores(reading.feature)
            probabilities = selected.probabilities * torch.tensor(allowed)
            probabilities = probabilities / probabilities.sum().clamp_min(1e-12)
            for i, name in enumerate(tables.selector.classes):
                if allowed[i]:
                    scores[name] = (group * float(probabilities[i]), "examples")
                    in_domain[name] = bool(selected.distance[i] <= selected.limit * config.domain_factor)
        ranked = sorted(scores.items(), key=lambda item: (-item[1][0], item[0]))
        candidates = tuple(Candidate(name, score, by) for name, (score, by) in ranked)
        best = candidates[0]
        reason = ""
        if best.score < config.threshold:
            reason = "below threshold"
        elif not in_domain.get(best.adapter, True):
            reason = "out of domain"
        return RouteDecision(candidates, bool(reason), reason, time.perf_counter() - started)

    def routable_counts(self) -> tuple[int, int]:
        """(adapters routed by their examples, by their weights only) in the current tables."""
        tables = self.tables  # one published value: never changes under us
        classes = tables.selector.classes
        return len(classes), len(tables.prototypes.keys() - set(classes))

    # -- learning --------------------------------------------------------------------------------

    def learn(self, adapter: str, prompts: Sequence[str]) -> LearnReport:
        """Add example prompts for `adapter` at run time (ExamplesError when they are unusable)."""
        prompts = check_prompts(prompts)
        with self._lock:
            with contextlib.suppress(OSError):  # a version's examples are its original's
                adapter = self._routable()[1].get(adapter, adapter)
            tables = self.tables.copy()
            report = tables.selector.learn(adapter, self._features(prompts), self.config.steps)
            known = tables.known.get(adapter, Known())
            kept = (known.runtime_prompts + prompts)[-256:]
            tables.known[adapter] = replace(known, runtime_prompts=kept)
            if self._needs_prototypes(tables):  # it now scores in the example group by its weights
                self._prototype(tables, adapter, self._reference())
            self._publish(tables)
        log.info(
            "router: learned %d example prompts of %s in %.2f s (%d steps)",
            len(prompts),
            adapter,
            report.seconds,
            report.steps,
        )
        return report

    def forget(self, adapter: str) -> None:
        with self._lock:
            tables = self.tables.copy()
            tables.selector.forget(adapter)
            tables.prototypes.pop(adapter, None)
            tables.known.pop(adapter, None)
            self._publish(tables)

    def reconcile(self, names: Collection[str] | None = None) -> ReconcileReport:
        """Bring the tables in line with the adapters the server has now (only `names`, when given:
        an adapter just loaded or unloaded): learn new or changed example files, forget adapters
        that are gone, build prototypes for adapters without examples."""
        started = time.perf_counter()
        learned: list[str] = []
        forgotten: list[str] = []
        weight_only: list[str] = []
        refused: list[tuple[str, str]] = []
        with self._lock:
            if self._stopping.is_set():
                return _STOPPED
            tables = self.tables.copy()
            listed, versions = self._routable()
            if names is None:
                scope = set(listed) | set(tables.known)
            else:  # and what a load or unload made a version, or routable again
                scope = set(names) | (set(versions) & set(tables.known)) | (set(listed) - set(tables.known))
            for name in sorted(scope - set(listed)):
                if name in tables.known or name in tables.selector.classes:
                    tables.selector.forget(name)
                    tables.prototypes.pop(name, None)
                    tables.known.pop(name, None)
                    forgotten.append(name)
            for name in sorted(scope & set(listed)):
                if self._stopping.is_set():
                    return _STOPPED
                why = self._sync_examples(tables, name, listed[name], learned)
                if why:
                    refused.append((name, why))
            without_examples = sorted(n for n in listed if n not in tables.selector.classes)
            if without_examples:  # they compete with the example group: every adapter needs prototypes
                reference: list[Taps] | None = None
                for name in sorted(listed):
                    if self._stopping.is_set():
                        return _STOPPED
                    if name in scope or name not in tables.prototypes:
                        reference = reference if reference is not None else self._reference()
                        why = self._prototype(tables, name, reference)
                        if why:
                            refused.append((name, why))
                        elif name in without_examples:
                            weight_only.append(name)
            else:
                tables.prototypes.clear()
            self._publish(tables)
            told, self._told_versions = self._told_versions, set(versions.items())
        report = ReconcileReport(
            tuple(learned),
            tuple(forgotten),
            tuple(weight_only),
            tuple(refused),
            time.perf_counter() - started,
            versions=tuple(sorted(versions.items())),
        )
        log.info(
            "router: %d adapters by examples, %d by weights only (%d learned now, %d forgotten) in %.1f s",
            len(self.tables.selector.classes),
            len(weight_only),
            len(learned),
            len(forgotten),
            report.seconds,
        )
        for name, why in refused:
            log.warning("router: adapter %s cannot be routed by its %s", name, why)
        for version, original in sorted(set(versions.items()) - told):
            log.info(
                "router: %s is a version of %s (compressed or exported): routed as %s",
                version,
                original,
                original,
            )
        return report

    def changed(self) -> set[str]:
        """Adapters that appeared in or left the adapter roots (or loads) since the tables were
        reconciled: what `reconcile(names)` should look at. Lists the roots and reads the small
        records of compressed or exported adapters (variants.py); loads no adapter."""
        return set(self._routable()[0]) ^ set(self.tables.known)

    def _routable(self) -> tuple[dict[str, Path], dict[str, str]]:
        """The adapters `auto` may route to now (name -> directory), and the routable adapters left
        out as versions of another ({version: the adapter routed for it})."""
        allowed = {n: d for n, d in self.source.directories().items() if self.config.allows(n)}
        versions = self._variants.of(allowed, self.source.refused)
        return {n: d for n, d in allowed.items() if n not in versions}, versions

    def _sync_examples(self, tables: Tables, name: str, directory: Path, learned: list[str]) -> str:
        """Learn `name`'s examples (its file's and those sent at run time) unless unchanged; returns
        why its file is not used ("" = fine)."""
        known = tables.known.get(name, Known())
        why = ""
        try:
            examples = read_examples(directory)
        except (ExamplesError, OSError) as exc:
            why, examples = f"examples.jsonl: {exc}", Examples((), "")
        prompts = examples.prompts + known.runtime_prompts
        if prompts and (examples.digest != known.examples_digest or name not in tables.selector.classes):
            tables.selector.forget(name)
            tables.selector.learn(name, self._features(prompts), self.config.steps)
            learned.append(name)
        elif not prompts and name in tables.selector.classes:
            tables.selector.forget(name)
        tables.known[name] = replace(known, examples_digest=examples.digest)
        return why

    def _prototype(self, tables: Tables, name: str, reference: list[Taps]) -> str:
        """Build `name`'s prototypes unless its weights are unchanged; returns why not ("" = done)."""
        try:
            adapter = self.source.adapter(name)
        except AdapterError as exc:
            tables.prototypes.pop(name, None)
            return f"weights ({exc})"
        known = tables.known.get(name, Known())
        if known.checksum != adapter.checksum or name not in tables.prototypes:
            vectors = adapter_vectors(adapter.lora_weights(), self._prototype_layers)
            tables.prototypes[name] = calibrated(vectors, reference)
            tables.known[name] = replace(known, checksum=adapter.checksum)
        return ""

    @property
    def _prototype_layers(self) -> int:
        return self.config.prototype_layers or self.reader.model.arch.num_layers

    def _reference(self) -> list[Taps]:
        """The taps of REFERENCE_PROMPTS, which prototypes' scores are standardized against."""
        render = [chat_prompt_ids(self.tokenizer, [("user", p)]) for p in REFERENCE_PROMPTS]
        return [self.reader.read(ids, self._prototype_layers).taps for ids in render]

    def _needs_prototypes(self, tables: Tables) -> bool:
        return any(n not in tables.selector.classes for n in tables.prototypes)

    def _features(self, prompts: Sequence[str]) -> torch.Tensor:
        """[n, dim]: each prompt as a chat's user turn, as chat clients send it."""
        rows = [self.reader.read(chat_prompt_ids(self.tokenizer, [("user", p)])).feature for p in prompts]
        return torch.stack(rows)

    def _publish(self, tables: Tables) -> None:
        self.tables = tables
        if self._files is not None:
            self._files.save(tables, self.state_key())

    def state_key(self) -> dict[str, Any]:
        """What saved tables must match to be reused: the model and how prompts are read."""
        model = self.reader.model
        return {
            "model": self.model_name,
            "hidden_size": model.arch.hidden_size,
            "num_layers": model.arch.num_layers,
            "vocab_size": model.arch.vocab_size,
            "layer": self.reader.layer,
            "prototype_layers": self.config.prototype_layers,
        }


class StoreSource:
    """The adapters of an AdapterStore (the roots and explicit loads) as the router sees them;
    `read` reads one into the host tier (the server's counts its loads; default `store.get`)."""

    def __init__(self, store: AdapterStore, read: Callable[[str], LoadedAdapter] | None = None) -> None:
        self.store = store
        self._read = read or store.get

    def directories(self) -> Mapping[str, Path]:
        return {stored.name: stored.directory for stored in self.store.list()}

    def adapter(self, name: str) -> LoadedAdapter:
        return self._read(name)

    def refused(self, name: str) -> bool:
        return self.store.refusal(name) is not None
