"""Platt scaling of a router's predicted success probabilities, per model, kept only where it helps.

Why: the λ and tolerance rules compare predictions *across* models. A router trained with one loss
over all models can run high on one model and low on another (a popular model's head sees more
positives), and then the tolerance rule sends a query to a dearer model that is not better. Platt
scaling (Platt 1999; scikit-learn's `CalibratedClassifierCV(method="sigmoid")`) refits each model's
probability as sigmoid(a · logit(p) + b) on held-out outcomes.

"Where it helps" is measured, not assumed: per model, the calibrated probabilities are cross-fitted
over `folds` stratified folds of the val queries (each query's probability from a fit that never saw
it) and compared with the raw ones by log loss, a proper scoring rule. A model is calibrated only when
the cross-fitted log loss is lower; its final (a, b) are then fitted on all of val. A model with too
few val outcomes of either class, or whose fitted slope is not positive (it would reverse the order
the router learned), keeps its raw predictions and says why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

EPS = 1e-6
MIN_PER_CLASS = 5  # fewer positives or negatives than this on val: no fit is trusted


@dataclass
class PlattFit:
    """One model's outcome: kept or not, its (a, b), and the val log losses that decided it."""

    model: str
    n: int  # val queries with a logged 0/1 score for this model
    kept: bool
    a: float = float("nan")
    b: float = float("nan")
    raw_log_loss: float = float("nan")
    calibrated_log_loss: float = float("nan")  # cross-fitted: each query's from a fit that did not see it
    reason: str = ""

    def as_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _fit(z: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, b) of sigmoid(a·z + b), by (nearly unregularised) logistic regression on the logit."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, max_iter=1000).fit(z[:, None], y.astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def apply(p: np.ndarray, a: float, b: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(a * logit(p) + b)))


def fit_model(name: str, p: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0) -> PlattFit:
    """Cross-fit, compare by log loss, and refit on all of `p`/`y` when calibration wins."""
    from sklearn.model_selection import StratifiedKFold

    p, y = np.asarray(p, float), np.asarray(y, float)
    n, pos = len(y), int(y.sum())
    if min(pos, n - pos) < max(MIN_PER_CLASS, folds):
        return PlattFit(name, n, False, reason=f"too few val outcomes of one class ({pos} right, {n - pos} wrong)")
    z = logit(p)
    cross = np.empty(n)
    for fit_idx, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(z, y):
        cross[held] = apply(p[held], *_fit(z[fit_idx], y[fit_idx]))
    raw, cal = log_loss(p, y), log_loss(cross, y)
    if not cal < raw:
        return PlattFit(name, n, False, raw_log_loss=raw, calibrated_log_loss=cal,
                        reason="cross-fitted log loss not lower than raw")
    a, b = _fit(z, y)
    if a <= 0:  # it would reverse the order the router learned on train: noise on a small val, not a calibration
        return PlattFit(name, n, False, raw_log_loss=raw, calibrated_log_loss=cal,
                        reason=f"fitted slope {a:.3g} <= 0 would reverse the router's ranking")
    return PlattFit(name, n, True, a, b, raw, cal)


def fit_all(perf_hat: np.ndarray, perf: np.ndarray, mask: np.ndarray, models: list[str],
            folds: int = 5, seed: int = 0) -> list[PlattFit]:
    """One PlattFit per model column, on the rows where that model's 0/1 score is logged."""
    return [fit_model(m, perf_hat[mask[:, j], j], perf[mask[:, j], j], folds, seed) for j, m in enumerate(models)]


def as_table(fits: list[PlattFit]) -> np.ndarray:
    """[M, 2] (a, b) per model, NaN for a model left raw: what the router's `score_calibration` buffer holds."""
    return np.array([[f.a, f.b] if f.kept else [np.nan, np.nan] for f in fits], dtype=np.float32)
