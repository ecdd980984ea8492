"""The trained selector: a linear softmax head over the adapters that have example prompts.

ConPET's PET-module selector, as a small value type: `learn(name, features)` adds an adapter as
one more class (or adds examples to one it has) and trains for a fixed number of steps, each
batch half this adapter's examples and half replay sampled across the others, so the cost of
adding one does not grow with how many exist. `scores(feature)` gives calibrated probabilities
(softmax at a temperature fitted on held-back examples) and each adapter's in-domain distance.

The head's logits are two linear terms:
- a closed-form discriminant (LDA): `x'P mu_c - mu_c'P mu_c / 2`, from each adapter's mean
  example `mu_c` and the within-adapter covariance pooled over all adapters (shrunk halfway to
  its mean variance: SHRINKAGE; P its inverse). Adding an adapter adds its mean and its scatter
  to the pool, nothing is retrained, and nothing learned before is overwritten;
- a correction `W z + b` over standardized features `z` (running per-dimension statistics,
  updated from new examples only), trained with cross-entropy on top of the discriminant.
With the correction alone (a plain softmax head trained with replay) the 64 synthetic adapters
were routed 78% right and the first ones were forgotten (60%); with the discriminant, 98.5%
(bench/RESULTS.md "Router").

A quarter of each adapter's examples (when it has 4 or more) is held back: the temperature is
fitted on them, and so is the in-domain limit. The in-domain test compares the prompt's squared
Mahalanobis distance to the best adapter's mean with `limit`, the 95th percentile of the
held-back examples' distances to their own adapter's mean (times the router's `domain_factor`).
On the demo tasks this tells out-of-domain prompts from held-out ones (AUROC 0.97) where the
softmax's own confidence cannot (a linear head is most confident far from its data).

It knows tensors only: nothing of the model, prompts, adapters on disk or the server.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

STEPS = 300  # training steps per learned adapter, whatever the number of adapters
BATCH = 64  # per step: BATCH // 2 of the new adapter's examples, the rest replay
LEARNING_RATE = 0.01
WEIGHT_DECAY = 1e-2
MAX_EXAMPLES = 256  # kept per adapter (training and held-back together); more are subsampled
MAX_CALIBRATION = 1024  # held-back examples used to fit the temperature
SHRINKAGE = 0.5  # of the pooled covariance towards a multiple of the identity


@dataclass(frozen=True)
class LearnReport:
    adapter: str
    examples: int  # examples given
    steps: int
    replay: int  # replayed examples over all steps
    seconds: float


@dataclass(frozen=True)
class SelectorScores:
    probabilities: torch.Tensor  # [classes] calibrated, sums to 1
    distance: torch.Tensor  # [classes] squared Mahalanobis distance to each adapter's mean example
    limit: float  # the in-domain limit of `distance`


class Selector:
    def __init__(self, dim: int, seed: int = 0) -> None:
        self.dim = dim
        self.classes: list[str] = []
        self.weight = torch.zeros(0, dim)
        self.bias = torch.zeros(0)
        self.temperature = 1.0
        self.count = 0  # examples the statistics have seen
        self.mean = torch.zeros(dim)
        self.m2 = torch.zeros(dim)  # running sum of squared deviations (Welford)
        self.train: dict[str, torch.Tensor] = {}  # adapter -> [n, dim] raw features
        self.held: dict[str, torch.Tensor] = {}  # adapter -> [m, dim] held back for calibration
        # The in-domain test: per adapter the sum and count of its examples, the within-adapter
        # scatter pooled over adapters, and what derives from them (precision, limit).
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.scatter = torch.zeros(dim, dim, dtype=torch.float64)
        self.precision = torch.eye(dim)
        self.means = torch.zeros(0, dim)  # [classes, dim]
        self.mean_terms = torch.zeros(0)  # [classes] mu' P mu
        self.limit = math.inf
        self._generator = torch.Generator().manual_seed(seed)

    def copy(self) -> Selector:
        other = Selector(self.dim)
        other.classes = list(self.classes)
        other.weight, other.bias = self.weight.clone(), self.bias.clone()
        other.temperature = self.temperature
        other.count, other.mean, other.m2 = self.count, self.mean.clone(), self.m2.clone()
        other.train, other.held = dict(self.train), dict(self.held)
        other.sums, other.counts, other.scatter = dict(self.sums), dict(self.counts), self.scatter.clone()
        other.precision, other.limit = self.precision, self.limit
        other.means, other.mean_terms = self.means, self.mean_terms
        other._generator.set_state(self._generator.get_state())
        return other

    # -- learning --------------------------------------------------------------------------------

    def learn(self, adapter: str, features: torch.Tensor, steps: int = STEPS) -> LearnReport:
        """Add `features` ([n, dim]) as examples of `adapter` (a new class or more examples of one)
        and train `steps` steps, half on them and half on replay of the other adapters."""
        assert features.ndim == 2 and features.shape[1] == self.dim and len(features), features.shape
        started = time.perf_counter()
        features = features.float()
        n = len(features)
        held = torch.arange(n) % 4 == 3 if n >= 4 else torch.zeros(n, dtype=torch.bool)
        self._update_statistics(features[~held])
        self._add_scatter(adapter, features[~held])
        train = torch.cat([self.train.get(adapter, features[:0]), features[~held]])
        kept_held = torch.cat([self.held.get(adapter, features[:0]), features[held]])
        self.train[adapter] = self._bounded(train, MAX_EXAMPLES - min(len(kept_held), MAX_EXAMPLES // 4))
        self.held[adapter] = self._bounded(kept_held, MAX_EXAMPLES // 4)
        if adapter not in self.classes:
            self.classes.append(adapter)
            self.weight = torch.cat([self.weight, torch.zeros(1, self.dim)])
            self.bias = torch.cat([self.bias, self.bias.mean(0, keepdim=True).nan_to_num(0.0)])
        self._update_domain()  # the shared precision and the means: the head's closed-form part
        replay = self._train(self.classes.index(adapter), steps)
        self._fit_temperature()
        return LearnReport(adapter, n, steps, replay, time.perf_counter() - started)

    def forget(self, adapter: str) -> None:
        """Drop `adapter`'s class and examples (the others keep their weights)."""
        if adapter not in self.classes:
            return
        index = self.classes.index(adapter)
        keep = [i for i in range(len(self.classes)) if i != index]
        self.classes.pop(index)
        self.weight, self.bias = self.weight[keep], self.bias[keep]
        for table in (self.train, self.held, self.sums, self.counts):
            table.pop(adapter, None)
        self._recompute_scatter()
        self._update_domain()
        self._fit_temperature()

    def _bounded(self, features: torch.Tensor, limit: int) -> torch.Tensor:
        if len(features) <= limit:
            return features
        keep = torch.randperm(len(features), generator=self._generator)[:limit]
        return features[keep.sort().values]

    def _update_statistics(self, features: torch.Tensor) -> None:
        """Merge the mean and squared deviations of `features` into the running ones (Chan et al.)."""
        if not len(features):
            return
        n, mean = len(features), features.mean(0)
        m2 = ((features - mean) ** 2).sum(0)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * n / total)
        self.count = total

    def standardized(self, features: torch.Tensor) -> torch.Tensor:
        variance = self.m2 / max(self.count - 1, 1)
        return (features - self.mean) / (variance + 1e-6 * variance.mean() + 1e-12).sqrt()

    def _train(self, target: int, steps: int) -> int:
        """`steps` Adam steps on batches half of class `target`, half replay; returns examples replayed."""
        others = [c for i, c in enumerate(self.classes) if i != target]
        if not others:
            return 0  # one class: the softmax is 1 whatever the weights
        weight = self.weight.clone().requires_grad_(True)
        bias = self.bias.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight, bias], lr=LEARNING_RATE)
        own = self.train[self.classes[target]]
        half = BATCH // 2
        g = self._generator
        # Replay for all steps drawn at once: a uniform adapter among the others, then a uniform
        # example of it (one pass over the adapters drawn, never over every stored example).
        replay_labels = torch.tensor([i for i in range(len(self.classes)) if i != target])[
            torch.randint(len(others), (steps, BATCH - half), generator=g)
        ]
        replay = torch.empty(steps, BATCH - half, self.dim)
        for label in replay_labels.unique().tolist():
            where = replay_labels == label
            pool = self.train[self.classes[label]]
            replay[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=g)]
        labels = torch.cat([torch.full((half,), target), torch.zeros(BATCH - half, dtype=torch.int64)])
        for step in range(steps):
            picks = [own[torch.randint(len(own), (half,), generator=g)], replay[step]]
            labels[half:] = replay_labels[step]
            raw = torch.cat(picks)
            logits = self.discriminant(raw) + self.standardized(raw) @ weight.T + bias
            loss = F.cross_entropy(logits, labels) + WEIGHT_DECAY * weight.square().sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.weight, self.bias = weight.detach(), bias.detach()
        return steps * (BATCH - half)

    def _fit_temperature(self) -> None:
        """The temperature minimizing the held-back examples' NLL (golden section on log T)."""
        if len(self.classes) < 2:
            self.temperature = 1.0
            return
        raw, labels = self._held_sample()
        if not len(raw):
            self.temperature = 1.0
            return
        logits = self.logits(raw)

        def nll(log_t: float) -> float:
            return float(F.cross_entropy(logits / math.exp(log_t), labels))

        low, high = math.log(0.05), math.log(20.0)
        ratio = (math.sqrt(5) - 1) / 2
        for _ in range(40):
            a, b = high - ratio * (high - low), low + ratio * (high - low)
            if nll(a) < nll(b):
                high = b
            else:
                low = a
        self.temperature = math.exp((low + high) / 2)

    def refresh(self) -> None:
        """Recompute what derives from the stored examples (after loading saved tables)."""
        self._recompute_scatter()
        self._update_domain()

    def _add_scatter(self, adapter: str, features: torch.Tensor) -> None:
        """Merge `features` into `adapter`'s sum and the pooled scatter (Chan et al.'s update)."""
        if not len(features):
            return
        x = features.double()
        n, mean = len(x), x.mean(0)
        centered = x - mean
        self.scatter = self.scatter + centered.T @ centered
        old = self.counts.get(adapter, 0)
        if old:
            delta = mean - self.sums[adapter].double() / old
            self.scatter = self.scatter + torch.outer(delta, delta) * (old * n / (old + n))
        self.sums[adapter] = self.sums.get(adapter, torch.zeros(self.dim)) + features.sum(0)
        self.counts[adapter] = old + n

    def _recompute_scatter(self) -> None:
        """The pooled scatter, sums and counts from the stored training examples (after a forget)."""
        self.scatter = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        self.sums, self.counts = {}, {}
        for name in self.classes:
            self._add_scatter(name, self.train[name])

    def _update_domain(self) -> None:
        """The shrunk pooled covariance's inverse, the adapters' means, and the in-domain limit from
        the held-back examples."""
        self.means = torch.stack([self.sums[c] / self.counts[c] for c in self.classes]) if self.classes else self.means[:0]  # fmt: skip
        total = sum(self.counts.values())
        spread = total > len(self.counts)  # else no spread measured yet: Euclidean, nothing out of domain
        if not spread:
            self.precision = torch.eye(self.dim)
        else:
            covariance = self.scatter / (total - len(self.counts))
            ridge = covariance.diagonal().mean() * torch.eye(self.dim, dtype=torch.float64)
            self.precision = torch.linalg.inv((1 - SHRINKAGE) * covariance + SHRINKAGE * ridge).float()
        self.mean_terms = ((self.means @ self.precision) * self.means).sum(1)
        raw, labels = self._held_sample()
        if not spread or not len(raw):
            self.limit = math.inf
            return
        distances = self.distances(raw).gather(1, labels.unsqueeze(1))
        self.limit = float(distances.quantile(0.95))

    def _held_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-back examples and their adapters' indices: at most MAX_CALIBRATION in all, the same
        number from each adapter (so fitting on them costs the same however many adapters exist)."""
        named = [(i, self.held[c]) for i, c in enumerate(self.classes) if len(self.held.get(c, ()))]
        if not named:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        per_class = max(1, MAX_CALIBRATION // len(named))
        raw = torch.cat([h[:per_class] for _, h in named])
        labels = torch.cat([torch.full((min(len(h), per_class),), i) for i, h in named])
        return raw, labels

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """[n, classes] squared Mahalanobis distances of `features` ([n, dim]) to each adapter's mean:
        x'Px - 2 x'P mu + mu'P mu."""
        x = features.float()
        projected = x @ self.precision  # [n, dim]
        return (projected * x).sum(1, keepdim=True) + self.discriminant(x, projected) * -2.0

    def discriminant(self, features: torch.Tensor, projected: torch.Tensor | None = None) -> torch.Tensor:
        """[n, classes] x'P mu - mu'P mu / 2: -d^2 / 2 without the x'Px / 2 every adapter shares, so
        the softmax is the same (LDA); linear in the features, a linear head's logits."""
        x = features.float()
        projected = x @ self.precision if projected is None else projected
        return projected @ self.means.T - 0.5 * self.mean_terms

    # -- scoring ---------------------------------------------------------------------------------

    def scores(self, feature: torch.Tensor) -> SelectorScores:
        """Calibrated probabilities over `classes` for one prompt's feature ([dim])."""
        assert self.classes, "scores needs at least one learned adapter"
        x = feature.float().unsqueeze(0)
        logits = self.logits(x)[0] / self.temperature
        return SelectorScores(torch.softmax(logits, 0), self.distances(x)[0], self.limit)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[n, classes] uncalibrated: the closed-form discriminant plus the trained correction."""
        return self.discriminant(features) + self.standardized(features) @ self.weight.T + self.bias
