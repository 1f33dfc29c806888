"""Exploration: the router's scores as an explicit stochastic policy, so served traffic is a bandit log.

A greedy router only ever logs its own first choice, so a model it underrates is never seen again
and `fit` on the request log cannot correct it. Serving through a policy that gives every available
backend some probability, and logging that probability (`propensity`) with each answer, lets
off-policy estimators weight the logged rewards back to any other policy.

    explore: none       the argmax of the router's scores among the available backends (probability 1)
    explore: epsilon    with probability 1-ε the argmax, else uniform over the K available backends
                        (so the argmax has 1-ε+ε/K and every other backend ε/K)
    explore: softmax    softmax(score / temperature) over the available backends
    floor: f            mixed with uniform afterwards, p ← (1-K·f)·p + f: every available backend keeps
                        at least f (0 ≤ f ≤ 1/K; f = 1/K is uniform); not with `none`, which stays greedy
    seed: S             the numpy Generator's seed: the same sequence of routing calls draws the same choices

`choice_probabilities` is the pure policy (scores, mask, settings -> probabilities) and
`sample_choices` draws from it; the pipeline (pipeline.py) calls both and the server logs the drawn
model's probability.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fusion_lightning.data.bandit import checkpoint_id, draw, logging_probabilities

sample_choices = draw  # one model per row, drawn from its probabilities (seeded, zero-probability never drawn)
__all__ = ["Exploration", "checkpoint_id", "choice_probabilities", "router_policy_id", "sample_choices",
           "weights_id"]

EXPLORE_KINDS = ("none", "epsilon", "softmax")
EXPLORE_KEYS = ("explore", "epsilon", "temperature", "floor", "seed")
_ONLY_FOR = {"epsilon": "epsilon", "temperature": "softmax"}  # a setting -> the one kind it applies to


@dataclass(frozen=True)
class Exploration:
    """The settings of the serving policy (see the module docstring); checked when made."""

    kind: str = "none"
    epsilon: float = 0.1
    temperature: float = 1.0
    floor: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in EXPLORE_KINDS:
            raise ValueError(f"unknown explore {self.kind!r}; valid: {list(EXPLORE_KINDS)}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon!r}")
        if not self.temperature > 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1/K] (K: the available backends), got {self.floor!r}")
        if self.floor and self.kind == "none":
            raise ValueError("floor needs explore: epsilon or softmax (explore: none always takes the argmax)")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Exploration:
        """From the router config's `explore`, `epsilon`, `temperature`, `floor`, `seed` (other keys ignored);
        a setting that the chosen kind does not use is an error rather than silently ignored."""
        kind = str(cfg.get("explore") or "none")
        for key, owner in _ONLY_FOR.items():
            if cfg.get(key) is not None and kind != owner:
                raise ValueError(f"router.{key} applies to explore: {owner}, not explore: {kind}")
        kw: dict[str, Any] = {"kind": kind}
        for key in ("epsilon", "temperature", "floor"):
            if cfg.get(key) is not None:
                kw[key] = _number(key, cfg[key])
        if cfg.get("seed") is not None:
            if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
                raise ValueError(f"seed must be an integer, got {cfg['seed']!r}")
            kw["seed"] = cfg["seed"]
        return cls(**kw)

    @property
    def stochastic(self) -> bool:
        return self.kind != "none"

    def check_support(self, k: int) -> None:
        """The floor must leave room for K backends: K·floor ≤ 1."""
        if k < 1:
            raise ValueError("the policy needs at least one available backend")
        if self.floor * k > 1.0 + 1e-12:
            raise ValueError(f"floor must be in [0, 1/K] = [0, {1 / k:.4g}] with K={k} available backends, "
                             f"got {self.floor!r}")

    def describe(self) -> str:
        """The settings in a policy id: '' (greedy), 'epsilon=0.2' or 'temperature=0.5' (softmax), plus
        ':floor=0.05'; the same suffixes fusion_lightning.data.bandit writes for a simulated router logger,
        so a served and a simulated log of one policy share its id."""
        head = {"none": "", "epsilon": f"epsilon={self.epsilon:g}",
                "softmax": f"temperature={self.temperature:g}"}[self.kind]
        return ":".join(s for s in (head, f"floor={self.floor:g}" if self.floor else "") if s)


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def choice_probabilities(scores: np.ndarray, available: np.ndarray, explore: Exploration) -> np.ndarray:
    """The policy: [N, M] router scores and the [M] mask of models that have a backend -> [N, M]
    probabilities (0 on unavailable models, each row sums to 1). Ties in the argmax go to the first."""
    s = np.asarray(scores, dtype=np.float64)
    avail = np.asarray(available, dtype=bool)
    if s.ndim != 2 or avail.shape != (s.shape[1],):
        raise ValueError(f"scores must be [N, M] and available [M]; got {s.shape} and {avail.shape}")
    k = int(avail.sum())
    explore.check_support(k)
    if not np.isfinite(s[:, avail]).all():
        raise ValueError("the router's scores for the available backends are not all finite")
    mask = np.broadcast_to(avail[None, :], s.shape)
    if explore.kind == "softmax":
        p = logging_probabilities(s, mask, temperature=explore.temperature)
    else:
        p = logging_probabilities(s, mask, epsilon=explore.epsilon if explore.kind == "epsilon" else 0.0)
    if explore.floor:
        p = (1.0 - k * explore.floor) * p + explore.floor * avail[None, :]
    return p


def weights_id(router: Any) -> str:
    """A short content hash of a loaded router's model names and weights: the id of a router given to
    the pipeline as an object (no file to hash)."""
    import torch

    h = hashlib.sha256("\x1f".join(router.models).encode())
    for name, value in sorted(router.module.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(value.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()[:12]


def router_policy_id(router_hash: str, explore: Exploration, lam: float = 0.0, tolerance: float | None = None) -> str:
    """'router:<hash>[:lam=<λ> | :tol=<τ>][:<settings>]', e.g. 'router:3f9a0c1d2e4b' (greedy) or
    'router:3f9a0c1d2e4b:tol=0.02:epsilon=0.2' (λ and τ change the decision, so they are part of the
    policy; the seed is not: it changes draws, not probabilities)."""
    rule = f"lam={lam:g}" if lam else (f"tol={tolerance:g}" if tolerance is not None else "")
    parts = [f"router:{router_hash}", rule, explore.describe()]
    return ":".join(p for p in parts if p)
