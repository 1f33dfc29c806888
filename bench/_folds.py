"""Helpers for bench/routers.py: cross-validation folds by query over pooled logs, the scikit-learn
baselines of the routing literature, a re-scoring noise estimate and throughput timing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fusion_lightning.data.arrow import codes, from_codes
from fusion_lightning.data.logtable import LogTable, _stratified_assign
from fusion_lightning.data.matrix import QueryMatrix
from fusion_lightning.data.schema import SPLITS


def query_folds(qm: QueryMatrix, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of each query row: stratified by task, seeded, independent of row order."""
    rng = np.random.default_rng(seed)
    texts = np.array(qm.queries, dtype=object)
    fold = np.empty(len(qm), np.int64)
    offset = 0
    for t in np.unique(qm.tasks):
        idx = np.flatnonzero(qm.tasks == t)
        idx = idx[np.argsort(texts[idx], kind="stable")]
        idx = idx[rng.permutation(len(idx))]
        fold[idx] = (np.arange(len(idx)) + offset) % k  # the offset keeps fold sizes within one query
        offset += len(idx)
    return fold


def fold_logs(logs: LogTable, qm: QueryMatrix, folds: np.ndarray, fold: int, val_fraction: float,
              seed: int) -> LogTable:
    """The logs with their split column set for one fold: test = the fold, val = a task-stratified
    `val_fraction` of the other folds (checkpoint selection / early stopping), train = the rest."""
    texts, tasks = np.array(qm.queries, dtype=object), np.asarray(qm.tasks, dtype=object)
    split = np.full(len(qm), "test", dtype=object)
    rest = folds != fold
    split[rest] = _stratified_assign(texts[rest], tasks[rest], {"val": val_fraction}, seed + fold, "train")
    by_text = dict(zip(qm.queries, split.tolist(), strict=True))
    t = logs.table
    qi, row_texts = codes(t["query"])
    names = list(SPLITS)
    code = np.array([names.index(by_text[x]) for x in row_texts], np.int64)
    table = t.set_column(t.schema.get_field_index("split"), "split", from_codes(code[qi], names))
    return LogTable(table, logs.catalog, logs.report, logs.task_descriptions)


# scikit-learn baselines (FusionFactory, RouterBench, LLMRouter) -----------------------------------
def _fit_sets(splits: dict, task_onehot: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(X_fit, Y_fit, X_test, mask_fit) with fit = train ∪ val (the baselines select no checkpoint)."""
    def feats(s: str) -> np.ndarray:
        x = splits[s].tensors["x"].numpy()
        if not task_onehot:
            return x
        n_tasks = int(max(int(splits[k].tensors["task"].max()) for k in splits)) + 1
        return np.hstack([x, np.eye(n_tasks, dtype=np.float32)[splits[s].tensors["task"].numpy()]])

    xf = np.vstack([feats("train"), feats("val")])
    yf = np.vstack([splits[s].tensors["perf"].numpy() for s in ("train", "val")])
    mf = np.vstack([splits[s].tensors["mask"].numpy() for s in ("train", "val")])
    return xf, yf, feats("test"), mf


class SklearnRouter:
    """A scikit-learn router: `fit` on embeddings, `scores` = predicted score per model (route argmax)."""

    def __init__(self, name: str, make: Callable[[], object], kind: str, task_onehot: bool = False):
        self.name, self.make, self.kind, self.task_onehot = name, make, kind, task_onehot

    def fit(self, splits: dict, n_models: int) -> tuple[np.ndarray, float]:
        """Fit on train ∪ val; returns (test scores [N, M], seconds to fit)."""
        xf, yf, xt, mf = _fit_sets(splits, self.task_onehot)
        self.n_models = n_models
        t0 = time.perf_counter()
        if self.kind == "argmax":  # one classifier on the index of the best model (ties: first column)
            self.est = self.make().fit(xf, np.where(mf, yf, -1).argmax(1))
        elif self.kind == "multi":  # one multi-output regressor of every model's score
            self.est = self.make().fit(xf, yf)
        else:  # one estimator per model; "binary" thresholds continuous scores at 0.5
            self.est = []
            for j in range(n_models):
                y = yf[mf[:, j], j]
                y = (y >= 0.5).astype(int) if self.kind == "binary" else y
                self.est.append(self.make().fit(xf[mf[:, j]], y) if len(np.unique(y)) > 1 else float(y.mean()))
        return self.predict(xt), time.perf_counter() - t0

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "argmax":
            out = np.zeros((len(x), self.n_models))
            out[:, self.est.classes_] = self.est.predict_proba(x)
            return out
        if self.kind == "multi":
            return self.est.predict(x)
        cols = []
        for e in self.est:
            if isinstance(e, float):
                cols.append(np.full(len(x), e))
            else:
                cols.append(e.predict_proba(x)[:, 1] if self.kind == "binary" else e.predict(x))
        return np.stack(cols, 1)


def sklearn_routers(seed: int) -> list[SklearnRouter]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.neural_network import MLPRegressor
    from sklearn.svm import LinearSVR

    return [
        SklearnRouter("sk_knn_clf", lambda: KNeighborsClassifier(n_neighbors=10), "argmax"),
        SklearnRouter("sk_mlp_reg", lambda: MLPRegressor(hidden_layer_sizes=(128,), early_stopping=True,
                                                         max_iter=300, random_state=seed), "multi"),
        SklearnRouter("sk_linear_svr", lambda: LinearSVR(random_state=seed, max_iter=5000), "per_model"),
        SklearnRouter("sk_logreg_task", lambda: LogisticRegression(max_iter=2000), "binary", task_onehot=True),
    ]


# label noise -------------------------------------------------------------------------------------
def rescoring_noise(path: str | Path) -> dict[str, float]:
    """The LLMRouter train and test files score some identical queries twice (separate runs).

    Returns how many of those (query, model) scores differ between the two copies, and the *copy
    oracle*: routing each query by its other copy's scores (ties to the model with the better mean),
    i.e. a router that knows the query's results from one run, scored on the other run. Its
    gap_closed (vs best single and oracle of the scored run, averaged over both directions) bounds
    what any router can close on those queries: the rest of the oracle's headroom is luck.
    """
    path = Path(path)
    train = {r["question"]: r["scores"] for r in json.loads((path / "scores_train.json").read_text())}
    test = {r["question"]: r["scores"] for r in json.loads((path / "scores_test.json").read_text())}
    both = sorted(set(train) & set(test))
    models = sorted(set(train[both[0]]) & set(test[both[0]]))
    a = np.array([[float(train[q][m]) for m in models] for q in both])
    b = np.array([[float(test[q][m]) for m in models] for q in both])
    gaps, rows = [], np.arange(len(both))
    for x, y in ((a, b), (b, a)):
        routed = y[rows, (x + 1e-3 * x.mean(0)).argmax(1)].mean()
        single, oracle = y[:, x.mean(0).argmax()].mean(), y.max(1).mean()
        gaps.append((routed - single) / (oracle - single))
    return {"queries": len(both), "scores_differ": float((a != b).mean()),
            "queries_differing": float((a != b).any(1).mean()), "copy_oracle_gap_closed": float(np.mean(gaps))}


# timing ------------------------------------------------------------------------------------------
def rate(fn: Callable[[int], object], n_max: int, budget_s: float = 4.0, probe: int = 4096) -> float:
    """Items per second of `fn(n)` (processes n items), on up to `n_max` items sized to ~budget_s."""
    fn(min(probe, n_max))  # warm-up
    t0 = time.perf_counter()
    fn(min(probe, n_max))
    per_item = (time.perf_counter() - t0) / min(probe, n_max)
    n = int(min(n_max, max(probe, budget_s / max(per_item, 1e-9))))
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - t0)
    return n / best


def mean_ci(values: list[float], fmt: str = "{:.2f}", level: float = 0.95) -> str:
    """'mean [lo, hi]': a t interval over folds (the folds share training data, so it is a rough one)."""
    from scipy import stats

    v = [x for x in values if x is not None and np.isfinite(x)]
    if len(v) < 2:
        return fmt.format(v[0]) if v else "—"
    half = stats.t.ppf((1 + level) / 2, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v))
    return f"{fmt.format(np.mean(v))} [{fmt.format(np.mean(v) - half)}, {fmt.format(np.mean(v) + half)}]"


def mean_std(values: list[float], fmt: str = "{:.3f}") -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "—"
    return fmt.format(np.mean(v)) + (" ± " + fmt.format(np.std(v)) if len(v) > 1 else "")
