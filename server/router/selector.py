"""The trained selector: a linear softmax head over the adapters that have example prompts.

ConPET's PET-module selector, as a small value type: `learn(name, features)` adds an adapter as
one more class (or adds examples to one it has) and trains for a fixed number of steps, each
batch half this adapter's examples and half replay sampled across the others, so the cost of
adding one does not grow with how many exist. `scores(feature)` gives calibrated probabilities
(softmax at a temperature fitted on held-back examples) and each adapter's in-domain distance.

What an add costs, whatever the number of adapters K: STEPS steps of BATCH examples, each step
a softmax over the adapters in its batch and the CONFUSABLE old adapters most like the new one
(at most BATCH // 2 + 1 + CONFUSABLE; their rows of the correction are the only ones it trains,
with Adam per row), so a step costs no more at 8,000 adapters than at 64; the replay's BATCH // 2
examples per step are drawn once per add; the temperature and the in-domain limit are refitted
on at most MAX_CALIBRATION held-back examples. What stays O(K) is what a K-class head cannot
avoid, once per add: the discriminant's K rows (the shared covariance changes with every add),
the K logits of the new examples and of the calibration examples. A softmax over every adapter
at every step cost O(K) per step (3.4x the FLOPs at 4x the adapters), and an adapter absent
from a step would get a near-zero gradient there unless it is confusable with the new one.

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
CONFUSABLE = 8  # old adapters in every step's softmax beside those of its batch (see _train)
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
    rows_per_step: int = 0  # the most head rows (adapters) one training step trained
    calibration: int = 0  # held-back examples the temperature and the in-domain limit were fitted on


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
        self.directions = torch.zeros(0, dim)  # [classes, dim] P mu: the discriminant's weights
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
        other.means, other.directions, other.mean_terms = self.means, self.directions, self.mean_terms
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
        replay, rows_per_step = self._train(self.classes.index(adapter), steps)
        calibration = self._fit_temperature()
        seconds = time.perf_counter() - started
        return LearnReport(adapter, n, steps, replay, seconds, rows_per_step, calibration)

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
        shift, scale = self._standardization()
        return (features - shift) * scale

    def _standardization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) [dim] each: the running mean and the inverse standard deviation."""
        variance = self.m2 / max(self.count - 1, 1)
        return self.mean, (variance + 1e-6 * variance.mean() + 1e-12).rsqrt()

    def _train(self, target: int, steps: int) -> tuple[int, int]:
        """`steps` Adam steps on batches half of class `target`, half replay; returns (examples
        replayed, the most classes one step trained)."""
        others = len(self.classes) - 1
        if not others:
            return 0, 0  # one class: the softmax is 1 whatever the weights
        g = self._generator
        half = BATCH // 2
        own = self.train[self.classes[target]]
        # 1) replay for all steps drawn at once: a uniform adapter among the others, then a
        # uniform example of it
        replay_labels = torch.randint(others, (steps, BATCH - half), generator=g)
        replay_labels += (replay_labels >= target).long()  # the others: every class but `target`
        replay = self._replay(replay_labels)  # [steps, BATCH - half, dim]
        shift, scale = self._standardization()
        labels = torch.cat([torch.full((steps, half), target), replay_labels], 1)  # [steps, BATCH]
        # 2) the old adapters the new examples score highest, the likeliest to be confused with
        # it: in every step's softmax, whether the replay drew them or not
        affinity = self.logits(own).mean(0)
        affinity[target] = -math.inf
        confusable = affinity.topk(min(CONFUSABLE, others)).indices
        adam = RowAdam(torch.cat([self.weight, self.bias.unsqueeze(1)], 1))  # [classes, dim + 1]: W | b
        ones = torch.ones(BATCH, 1)
        widest = 0
        for step in range(steps):
            # 3) the softmax over this batch's classes and the confusable ones only: the step
            # trains their rows and no other
            rows, inverse = torch.cat([labels[step], confusable]).unique(return_inverse=True)
            targets = inverse[:BATCH]
            widest = max(widest, len(rows))
            raw = torch.cat([own[torch.randint(len(own), (half,), generator=g)], replay[step]])
            z = torch.cat([(raw - shift) * scale, ones], 1)  # [BATCH, dim + 1]: standardized, 1 for b
            head = adam.table[rows]  # [rows, dim + 1]
            logits = raw @ self.directions[rows].T - 0.5 * self.mean_terms[rows] + z @ head.T
            # 4) the gradient of the cross-entropy plus WEIGHT_DECAY * |W|^2 (not b), by hand: the
            # autograd graph of so small a step costs more than the step
            grad = cross_entropy_gradient(logits, targets).T @ z
            grad[:, :-1] += 2 * WEIGHT_DECAY * head[:, :-1]
            adam.step(rows, grad)
        self.weight, self.bias = adam.table[:, :-1].contiguous(), adam.table[:, -1].contiguous()
        return steps * (BATCH - half), widest

    def _replay(self, labels: torch.Tensor) -> torch.Tensor:
        """[*labels.shape, dim]: for each label a uniform example of that class's training pool, in
        one pass over the classes drawn, each handling only its own draws."""
        flat = labels.flatten()
        order = flat.argsort()
        drawn, counts = flat[order].unique_consecutive(return_counts=True)
        replay = torch.empty(len(flat), self.dim)
        start = 0
        for label, count in zip(drawn.tolist(), counts.tolist(), strict=True):
            pool = self.train[self.classes[label]]
            replay[order[start : start + count]] = pool[
                torch.randint(len(pool), (count,), generator=self._generator)
            ]
            start += count
        return replay.view(*labels.shape, self.dim)

    def _fit_temperature(self) -> int:
        """The temperature minimizing the held-back examples' NLL (golden section on log T);
        returns how many examples it was fitted on."""
        raw, labels = self._held_sample()
        if len(self.classes) < 2 or not len(raw):
            self.temperature = 1.0
            return 0
        logits = self.logits(raw)

        def nll(log_t: float) -> float:
            return float(F.cross_entropy(logits / math.exp(log_t), labels))

        low, high = math.log(0.05), math.log(20.0)
        ratio = (math.sqrt(5) - 1) / 2
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        nll_a, nll_b = nll(a), nll(b)
        for _ in range(40):  # one new evaluation per step: the golden ratio reuses the other point
            if nll_a < nll_b:
                high, b, nll_b = b, a, nll_a
                a = high - ratio * (high - low)
                nll_a = nll(a)
            else:
                low, a, nll_a = a, b, nll_b
                b = low + ratio * (high - low)
                nll_b = nll(b)
        self.temperature = math.exp((low + high) / 2)
        return len(raw)

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
        self.directions = self.means @ self.precision  # P mu per adapter (P is symmetric)
        self.mean_terms = (self.directions * self.means).sum(1)
        raw, labels = self._held_sample()
        if not spread or not len(raw):
            self.limit = math.inf
            return
        centered = raw - self.means[labels]  # each example's distance to its own adapter's mean only
        self.limit = float(((centered @ self.precision) * centered).sum(1).quantile(0.95))

    def _held_sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-back examples and their adapters' indices: at most MAX_CALIBRATION in all, the same
        number from each adapter (from every adapter while there are at most MAX_CALIBRATION)."""
        named = [(i, self.held[c]) for i, c in enumerate(self.classes) if len(self.held.get(c, ()))]
        if not named:
            return torch.zeros(0, self.dim), torch.zeros(0, dtype=torch.int64)
        named = named[:: math.ceil(len(named) / MAX_CALIBRATION)]  # past MAX_CALIBRATION: an even spread
        per_class = max(1, MAX_CALIBRATION // len(named))
        raw = torch.cat([h[:per_class] for _, h in named])
        labels = torch.cat([torch.full((min(len(h), per_class),), i) for i, h in named])
        return raw, labels

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """[n, classes] squared Mahalanobis distances of `features` ([n, dim]) to each adapter's mean:
        x'Px - 2 x'P mu + mu'P mu."""
        x = features.float()
        return ((x @ self.precision) * x).sum(1, keepdim=True) + self.discriminant(x) * -2.0

    def discriminant(self, features: torch.Tensor) -> torch.Tensor:
        """[n, classes] x'P mu - mu'P mu / 2: -d^2 / 2 without the x'Px / 2 every adapter shares, so
        the softmax is the same (LDA); linear in the features, a linear head's logits."""
        return features.float() @ self.directions.T - 0.5 * self.mean_terms

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


def cross_entropy_gradient(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[n, classes] the gradient of F.cross_entropy(logits, targets) (the mean over the n rows) with
    respect to `logits`: (softmax - one-hot) / n."""
    grad = torch.softmax(logits, 1)
    grad[torch.arange(len(targets)), targets] -= 1
    return grad / len(targets)


class RowAdam:
    """Adam (torch.optim.Adam's defaults) on a table whose rows are trained a few at a time: a step
    updates only the rows it is given, each row counting its own steps (a lazy Adam, as
    torch.optim.SparseAdam is), so it costs those rows, not the table. A row trained at every step
    follows Adam's trajectory exactly. Works on a copy: the table given is not changed."""

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, table: torch.Tensor, lr: float = LEARNING_RATE) -> None:
        self.table = table.detach().clone()  # [rows, width]
        self.first = torch.zeros_like(self.table)
        self.second = torch.zeros_like(self.table)
        self.steps = torch.zeros(len(self.table), 1)
        self.lr = lr

    def step(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """One step for `rows` ([r] distinct indices), given the gradient at them ([r, width])."""
        beta1, beta2 = self.BETAS
        t = self.steps[rows] + 1  # [r, 1]
        m = self.first[rows].lerp(grad, 1 - beta1)
        v = self.second[rows].lerp(grad.square(), 1 - beta2)
        self.steps[rows], self.first[rows], self.second[rows] = t, m, v
        denominator = (v / (1 - beta2**t)).sqrt() + self.EPS
        self.table[rows] -= self.lr / (1 - beta1**t) * m / denominator
