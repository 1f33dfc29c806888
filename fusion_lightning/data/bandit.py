"""Bandit logs: what serving leaves behind (one model, or a few, per query, chosen by a policy).

A *full-information* log has a call to every model for every query (a benchmark: LLMFusionBench,
RouterBench, LLMRouter), so a router's choice can be scored on every query and oracle / random /
gap closed are defined. A *bandit log* has the model(s) a logging policy chose: a router's choice is
observed only where it agrees with the logger, and its quality is estimated off-policy
(fusion_lightning.query.ope) from the **propensity** of each logged call, the probability with
which the logging policy chose it.

Here: telling the two apart (`describe_log`), turning a full log into a simulated bandit log under a
named logging policy so every estimator can be checked against the truth the full log still holds
(`simulate_bandit`, `data.bandit=...`), and estimating propensities when a log has none
(`estimate_propensities`, `data.propensity=estimate`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from fusion_lightning.data.arrow import codes, from_codes
from fusion_lightning.data.matrix import QueryMatrix

LOG_KINDS = ("auto", "full", "bandit")
LOGGERS = ("none", "uniform", "router")
PROPENSITY_SOURCES = ("logged", "estimate")
# auto: a log with some pairs missing is still full-information while most pairs are there (a benchmark
# with a few failed calls); at or below this share of present pairs, or with propensities, it is a bandit log
FULL_SHARE = 0.5


@dataclass
class LogShape:
    """How many calls a log has per query and per model, and which kind of log that makes it."""

    kind: str  # "full" | "bandit"
    queries: int
    models: list[str]
    calls_per_query: tuple[float, int, int]  # mean, min, max
    queries_per_model: dict[str, int]
    has_propensities: bool
    policies: dict[str, int]  # policy id -> calls (empty when the log names none)
    reason: str  # why this kind

    def counts(self) -> dict[str, int]:
        """The integer counts summary.json carries."""
        return {"bandit_log": int(self.kind == "bandit"), "calls_per_query_min": self.calls_per_query[1],
                "calls_per_query_max": self.calls_per_query[2]}

    def note(self) -> str:
        mean, lo, hi = self.calls_per_query
        per_model = ", ".join(f"{m} {n}" for m, n in self.queries_per_model.items())
        text = (f"{'bandit' if self.kind == 'bandit' else 'full-information'} log ({self.reason}): "
                f"{mean:.2f} calls per query (min {lo}, max {hi}) of {len(self.models)} models; "
                f"queries per model: {per_model}")
        if self.kind == "bandit":
            text += ("; propensities logged" if self.has_propensities else "; no propensities logged")
            if self.policies:
                text += " (policies: " + ", ".join(f"{p} {n} calls" for p, n in self.policies.items()) + ")"
            text += ("; oracle, random, gap closed and the per-task table need every model's answer and are not "
                     "computed: off-policy estimates (IPS, SNIPS, DR) are reported instead")
        return text


def describe_log(table: pa.Table, models: list[str], kind: str = "auto") -> LogShape:
    """The shape of a validated log table; `kind` forces full or bandit (`data.log_kind`)."""
    if kind not in LOG_KINDS:
        raise ValueError(f"data.log_kind={kind!r}; choose from: {', '.join(LOG_KINDS)}")
    qi, qids = codes(table["query_id"])
    mi, mvalues = codes(table["model"])
    per_query = np.bincount(qi, minlength=len(qids)) if len(qids) else np.zeros(1, int)
    per_model_code = np.bincount(mi, minlength=len(mvalues))
    per_model = {m: int(per_model_code[mvalues.index(m)]) for m in models if m in mvalues}
    has_prop = table["propensity"].null_count < len(table)
    pol_i, pol_values = codes(table["policy"])
    policies = {}
    if table["policy"].null_count < len(table):
        counts = np.bincount(pol_i[pol_i >= 0], minlength=len(pol_values)) if (pol_i >= 0).any() else []
        policies = {str(v): int(c) for v, c in zip(pol_values, counts, strict=False) if v is not None and c}
    share = len(table) / max(len(qids) * len(models), 1)
    if kind != "auto":
        chosen, reason = kind, f"data.log_kind={kind}"
    elif share >= 1.0:
        chosen, reason = "full", "every query has every model"
    elif has_prop:
        chosen, reason = "bandit", "a subset of models per query, with propensities"
    elif share <= FULL_SHARE:
        chosen, reason = "bandit", f"only {share:.0%} of (query, model) pairs have a call"
    else:
        chosen, reason = "full", f"{share:.0%} of (query, model) pairs have a call; the rest are masked"
    return LogShape(chosen, len(qids), list(models), (float(per_query.mean()), int(per_query.min()),
                                                      int(per_query.max())),
                    per_model, has_prop, policies, reason)


# -- simulated bandit logs ---------------------------------------------------------------------------
def logging_probabilities(scores: np.ndarray | None, available: np.ndarray, epsilon: float = 0.0,
                          temperature: float | None = None) -> np.ndarray:
    """[N, M] probabilities of a logging policy over each query's available models.

    No scores: uniform. Scores with a temperature: softmax(scores / T). Scores without: greedy (the
    argmax, ties to the first). Then ε of the mass is spread uniformly, so ε > 0 gives every available
    model support."""
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    avail = np.asarray(available, bool)
    if not avail.any(axis=1).all():
        raise ValueError("a query has no model to choose from")
    uniform = avail / avail.sum(axis=1, keepdims=True)
    if scores is None:
        return uniform
    s = np.where(avail, np.asarray(scores, float), -np.inf)
    if temperature is not None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        z = np.exp((s - s.max(axis=1, keepdims=True)) / temperature)
        base = z / z.sum(axis=1, keepdims=True)
    else:
        base = np.zeros_like(uniform)
        base[np.arange(len(s)), s.argmax(axis=1)] = 1.0
    return (1.0 - epsilon) * base + epsilon * uniform


def draw(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One column index per row, drawn from the row's probabilities (one uniform per row, in row order, so
    a seeded generator repeats). A column with probability 0 is never drawn."""
    p = np.asarray(probs, dtype=np.float64)
    if not len(p):
        return np.zeros(0, dtype=np.int64)
    cum = np.cumsum(p, axis=1)
    u = rng.random(len(p)) * cum[:, -1]
    idx = (cum <= u[:, None]).sum(axis=1)  # the first column whose cumulative probability passes u
    last = p.shape[1] - 1 - (p[:, ::-1] > 0).argmax(axis=1)  # rounding at the top end: the last supported
    return np.minimum(idx, last)


def checkpoint_id(path: str | Path) -> str:
    """A short content hash of a checkpoint file (the first 12 hex digits of its SHA-256): the policy id a
    router logs under, served (fusion_lightning.serving.explore) or simulated; the same weights served from a
    copy keep their id, a retrained checkpoint gets a new one."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def simulate_bandit(table: pa.Table, qm: QueryMatrix, logger: str = "uniform", *, epsilon: float = 0.0,
                    temperature: float | None = None, scores: np.ndarray | None = None,
                    policy_id: str | None = None, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Keep one call per query of a full-information log, drawn by a named logging policy, with its
    propensity and the policy id written on the row; returns (bandit table, [Q, M] the logger's
    probabilities in `qm`'s order).

    `qm` is the log's matrix (same queries and models as `table`): the logger chooses among the models
    each query has. `logger`: uniform, or router: greedy on `scores` ([Q, M], a router's predicted reward;
    the query level computes them, see RouterDataModule), or their softmax with a temperature; either
    mixed with ε uniform exploration. Seeded: the same seed draws the same calls."""
    if logger not in LOGGERS[1:]:
        raise ValueError(f"data.bandit.logger={logger!r}; choose from: {', '.join(LOGGERS)}")
    if logger == "router" and scores is None:
        raise ValueError("data.bandit.logger=router needs a router's scores (data.bandit.checkpoint=PATH)")
    probs = logging_probabilities(scores if logger == "router" else None, qm.mask, epsilon, temperature)
    chosen = draw(probs, np.random.default_rng(seed))
    policy = policy_id or logger
    if epsilon:
        policy += f":epsilon={epsilon:g}"
    if temperature is not None and logger == "router":
        policy += f":temperature={temperature:g}"
    # rows: the (query, chosen model) call of each query
    qi, qids = codes(table["query_id"])
    mi, mvalues = codes(table["model"])
    col = np.array([qm.models.index(m) if m in qm.models else -1 for m in mvalues], np.int64)[mi]
    row_of = {q: i for i, q in enumerate(qm.query_ids.tolist())}
    q_of_code = np.array([row_of.get(q, -1) for q in qids], np.int64)[qi]
    keep = (q_of_code >= 0) & (col == chosen[np.maximum(q_of_code, 0)])
    out = table.filter(pa.array(keep))
    rows = q_of_code[keep]
    prop = probs[rows, chosen[rows]]
    out = out.set_column(out.schema.get_field_index("propensity"), "propensity", pa.array(prop, pa.float64()))
    out = out.set_column(out.schema.get_field_index("policy"), "policy",
                         from_codes(np.zeros(len(out), np.int64), [policy]))
    return out, probs


# -- estimated propensities ----------------------------------------------------------------------------
def estimate_propensities(features: np.ndarray, tasks: np.ndarray, mask: np.ndarray, folds: int = 5,
                          seed: int = 0, floor: float = 0.01) -> np.ndarray:
    """[N, M] cross-fitted estimates of the probability that the logging policy chose each model for each
    query, from the logged choices: a logistic regression of the choice on the query's features and task,
    fitted on the other folds' queries, so no query's own choice shapes its propensity.

    One call per query: a multinomial model of the chosen model. Several: one binary model per model (its
    probability of being among the logged ones). Clipped below at `floor` (an estimated 0 would make a
    logged call's weight infinite)."""
    from sklearn.linear_model import LogisticRegression

    mask = np.asarray(mask, bool)
    n, m = mask.shape
    x = design_matrix(features, tasks)
    fold = query_folds(n, folds, seed)
    out = np.full((n, m), np.nan)
    single = bool((mask.sum(axis=1) == 1).all())
    for k in range(fold.max() + 1):
        fit_rows, pred_rows = fold != k, fold == k
        if not pred_rows.any():
            continue
        if single:
            y = mask[fit_rows].argmax(axis=1)
            out[pred_rows] = _class_probs(LogisticRegression(max_iter=500), x[fit_rows], y, x[pred_rows], m)
        else:
            for j in range(m):
                y = mask[fit_rows, j].astype(int)
                out[pred_rows, j] = _class_probs(LogisticRegression(max_iter=500), x[fit_rows], y,
                                                 x[pred_rows], 2)[:, 1]
    return np.clip(out, floor, 1.0)


def _class_probs(clf, x: np.ndarray, y: np.ndarray, x_new: np.ndarray, n_classes: int) -> np.ndarray:
    """[len(x_new), n_classes] predicted class probabilities; a class never seen in `y` gets 0 (a single
    seen class gets 1)."""
    out = np.zeros((len(x_new), n_classes))
    seen = np.unique(y)
    if len(seen) == 1:
        out[:, seen[0]] = 1.0
        return out
    clf.fit(x, y)
    out[:, clf.classes_] = clf.predict_proba(x_new)
    return out


def design_matrix(features: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Features plus a one-hot of the task: what a reward or propensity model of a query reads."""
    _, t = np.unique(np.asarray(tasks).astype(str), return_inverse=True)
    onehot = np.eye(t.max() + 1 if len(t) else 1, dtype=np.float32)[t]
    return np.hstack([np.asarray(features, np.float32), onehot])


def query_folds(n: int, k: int, seed: int) -> np.ndarray:
    """[n] fold index of each query, seeded, balanced."""
    if k < 2:
        raise ValueError(f"cross-fitting needs at least 2 folds, got {k}")
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, np.int64)
    out[perm] = np.arange(n) % k
    return out
