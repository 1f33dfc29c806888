"""The layer probe: which hidden layer of a causal LM tells each model's right answers from its wrong ones.

    python -m fusion_lightning.fit recipe=layer_probe data=llmrouter encoder=hf:smollm2-135m [model.layers=2]

A Lightning predict job like the embed recipe (sharded, resumable, DDP, `submit recipe=layer_probe`):
the train split's queries (`datamodule.split=train`; `datamodule.max_texts=N` for a seeded sample) go
through the model once per batch with every hidden state kept (`output_hidden_states`), and each
candidate layer's pooled vectors are written to the embedding cache under that layer's own encoder
name (`hf:NAME@LAYER`), so the probe never runs the model twice for a text, and a later
`encoder=hf:NAME@<pick>` finds the train queries embedded already. Then, on train only, per layer:

- **separability** (`fisher`): for each model of the log, its correct (score >= 0.5) against its
  incorrect queries, J = (mu1 - mu0)^T (Sigma_w + eps I)^-1 (mu1 - mu0) in the top `pca_dim` principal
  components of the layer's unit vectors (the two classes' pooled within-class covariance, eps =
  1e-3 x its mean eigenvalue), averaged over the models with at least `min_class` queries in each
  class. `fisher_within_task` is the same after subtracting each task's mean from the vectors: the
  part of the signal that the per-task lookup does not already have;
- **effective dimensionality**: the participation ratio (sum lambda)^2 / sum lambda^2 of the
  eigenvalues of the vectors' covariance, and that over the dimension.

The pick: the layer with the largest `criterion` (default `fisher`); layers within `tie` (1 %) of the
best count as tied and the one with the largest participation ratio per dimension wins (the less
anisotropic space). Written to the run dir as `probe.csv` (one row per layer), `probe.png` (the curves)
and `probe.json` (the pick and the table), and cached where `hf:NAME` without a layer finds it:
`<cache root>/layer_probe/<model>-<hash of its directory>/<pool>.json` (fusion_lightning.cache)
(`prefill_encoder.probe_pick_path`).
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.data.embed_job import EmbedDataModule, EncoderModule
from fusion_lightning.data.embeddings import CONCAT, EmbeddingCache, build_encoder, encoder_spec
from fusion_lightning.data.prefill_encoder import PrefillEncoder, layer_name, probe_pick_path
from fusion_lightning.io import atomic_write

CRITERIA = ("fisher", "fisher_within_task")


def fisher_separability(z: np.ndarray, y: np.ndarray, eps: float = 1e-3) -> float:
    """(mu1 - mu0)^T (Sigma_w + eps * mean eigenvalue * I)^-1 (mu1 - mu0) of rows `z` split by boolean `y`."""
    a, b = z[y], z[~y]
    d = a.mean(0) - b.mean(0)
    sw = ((a - a.mean(0)).T @ (a - a.mean(0)) + (b - b.mean(0)).T @ (b - b.mean(0))) / max(len(z) - 2, 1)
    ridge = eps * max(float(np.trace(sw)) / len(sw), 1e-12)
    return float(d @ np.linalg.solve(sw + ridge * np.eye(len(sw)), d))


def participation_ratio(x: np.ndarray, singular_values: np.ndarray | None = None) -> float:
    """(sum lambda)^2 / sum lambda^2 of the covariance eigenvalues of rows `x` (1 .. dim); the centred
    rows' singular values may be given instead of computed."""
    sv = np.linalg.svd(x - x.mean(0), compute_uv=False) if singular_values is None else singular_values
    s = sv ** 2
    return float(s.sum() ** 2 / max(float((s ** 2).sum()), 1e-30))


def pca(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows of `x` in its top `k` principal components, the centred rows' singular values)."""
    xc = x - x.mean(0)
    _, sv, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:k].T, sv


def layer_scores(x: np.ndarray, correct: np.ndarray, tasks: np.ndarray, models: Sequence[str],
                 pca_dim: int = 32, min_class: int = 5) -> dict[str, Any]:
    """One layer's row: mean `fisher` and `fisher_within_task` over the models that have `min_class`
    queries in each class (per model in `per_model`), participation ratio and its share of the dim.
    `correct`: [Q, M] 1.0 / 0.0, NaN where the log has no call."""
    x = np.asarray(x, np.float64)
    k = max(1, min(int(pca_dim), x.shape[1], len(x) - 2))
    z, sv = pca(x, k)
    zt = z.copy()
    for t in np.unique(tasks):
        zt[tasks == t] -= zt[tasks == t].mean(0)
    per_model: dict[str, dict[str, float]] = {}
    for j, m in enumerate(models):
        seen = ~np.isnan(correct[:, j])
        y = correct[seen, j] >= 0.5
        if y.sum() < min_class or (~y).sum() < min_class:
            continue
        per_model[m] = {"fisher": fisher_separability(z[seen], y),
                        "fisher_within_task": fisher_separability(zt[seen], y)}
    pr = participation_ratio(x, sv)
    row: dict[str, Any] = {c: float(np.mean([v[c] for v in per_model.values()])) if per_model else float("nan")
                           for c in CRITERIA}
    row.update(participation_ratio=pr, pr_per_dim=pr / x.shape[1], models=len(per_model), pca_dim=k,
               per_model=per_model)
    return row


def pick_layer(rows: Sequence[dict[str, Any]], criterion: str = "fisher", tie: float = 0.01) -> int:
    """The layer with the largest `criterion`; those within `tie` (relative) of it are tied, and the
    largest participation ratio per dimension among them wins."""
    if criterion not in CRITERIA:
        raise ValueError(f"layer probe criterion {criterion!r}; choose from: {', '.join(CRITERIA)}")
    ok = [r for r in rows if np.isfinite(r[criterion])]
    if not ok:
        raise ValueError("layer probe: no model of the log has enough correct and incorrect train queries "
                         "to measure separability")
    best = max(r[criterion] for r in ok)
    tied = [r for r in ok if r[criterion] >= best - tie * abs(best)]
    return int(max(tied, key=lambda r: (r["pr_per_dim"], -r["layer"]))["layer"])


def probe(features: dict[int, np.ndarray], correct: np.ndarray, tasks: np.ndarray, models: Sequence[str],
          pca_dim: int = 32, criterion: str = "fisher", min_class: int = 5, tie: float = 0.01
          ) -> tuple[list[dict[str, Any]], int]:
    """(one row per layer, the picked layer) from each layer's [Q, D] vectors of the same train queries."""
    rows = [{"layer": layer, **layer_scores(x, correct, tasks, models, pca_dim, min_class)}
            for layer, x in sorted(features.items())]
    return rows, pick_layer(rows, criterion, tie)


COLUMNS = ("layer", "fisher", "fisher_within_task", "participation_ratio", "pr_per_dim", "models", "pca_dim")


def write_probe(rows: Sequence[dict[str, Any]], pick: int, out_dir: str | Path, meta: dict[str, Any]) -> dict[str, str]:
    """probe.csv, probe.png and probe.json in `out_dir`; name -> path."""
    out = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r[c] if isinstance(r[c], int) else f"{r[c]:.6g}" for c in COLUMNS])
    atomic_write(out / "probe.csv", buf.getvalue())
    atomic_write(out / "probe.json", json.dumps({**meta, "layer": pick, "layers": list(rows)}, indent=2))
    _plot(rows, pick, out / "probe.png", meta)
    return {"probe_csv": str(out / "probe.csv"), "probe_png": str(out / "probe.png"),
            "probe_json": str(out / "probe.json")}


def _plot(rows: Sequence[dict[str, Any]], pick: int, path: Path, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(layers, [r["fisher"] for r in rows], "o-", label="Fisher separability (mean over models)")
    ax.plot(layers, [r["fisher_within_task"] for r in rows], "s--", label="within task")
    ax.axvline(pick, color="grey", ls=":", label=f"pick: layer {pick}")
    ax.set_xlabel("layer (hidden_states index)")
    ax.set_ylabel("Fisher separability")
    ax2 = ax.twinx()
    ax2.plot(layers, [r["pr_per_dim"] for r in rows], "^-", color="tab:green", label="participation ratio / dim")
    ax2.set_ylabel("participation ratio / dim")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1], fontsize=8, loc="best")
    ax.set_title(f"layer probe: {meta.get('encoder', '')} on {meta.get('queries', '?')} train queries", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def candidate_layers(layers: str | int | Sequence[int], num_layers: int) -> list[int]:
    """`all` -> 0..L; an int N -> every Nth layer from 0, and L; a list -> those (negative from the top)."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layer probe layers={layers!r}: 'all', a stride (an int) or a list of layers")
        return list(range(num_layers + 1))
    if isinstance(layers, int):
        if layers <= 0:
            raise ValueError(f"layer probe layers={layers}: a stride must be positive")
        return sorted(set(range(0, num_layers + 1, layers)) | {num_layers})
    out = sorted({num_layers + 1 + int(x) if int(x) < 0 else int(x) for x in layers})
    if not out or out[0] < 0 or out[-1] > num_layers:
        raise ValueError(f"layer probe layers={list(layers)}: the model has layers 0..{num_layers}")
    return out


class LayerProbe(EncoderModule):
    """The probe's LightningModule: an `EncoderModule` over every candidate layer of `encoder` (one group:
    one forward pass per batch), then, after the job, the separability table (`after_predict`)."""

    def __init__(self, encoder: str = "hf:smollm2-135m", layers: str | int | Sequence[int] = "all",
                 pca_dim: int = 32, criterion: str = "fisher", min_class: int = 5, tie: float = 0.01,
                 out_dir: str | None = None, cache_pick: bool = True):
        spec = encoder_spec(encoder)
        base = build_encoder(spec)
        if not isinstance(base, PrefillEncoder) or CONCAT in spec:
            raise ValueError(f"the layer probe needs one hf:NAME[:POOL] encoder, got {spec!r}")
        if base._given_layer is not None:
            raise ValueError(f"encoder {spec!r}: the layer probe picks the layer; give hf:NAME[:POOL] without @LAYER")
        if criterion not in CRITERIA:
            raise ValueError(f"layer probe criterion {criterion!r}; choose from: {', '.join(CRITERIA)}")
        self.base = base
        self.candidates = candidate_layers(layers, base.num_layers)
        super().__init__(CONCAT.join(layer_name(base.model, k, base.pool, base.max_seq_length)
                                     for k in self.candidates))
        self.pca_dim, self.criterion, self.min_class, self.tie = int(pca_dim), criterion, int(min_class), float(tie)
        self.out_dir, self.cache_pick = out_dir, bool(cache_pick)
        self.artifacts: dict[str, str] = {}
        self.summary_fields: dict[str, Any] = {}

    def after_predict(self, dm: EmbedDataModule) -> dict[str, Any]:
        """Global rank 0, once every rank's shards are written: the table, the pick, its files and cache."""
        t0 = time.perf_counter()
        texts = set(dm.texts())
        qm = dm.logs.matrix()
        rows = np.flatnonzero(np.isin(qm.splits, [dm.split or "train"])
                              & np.array([q in texts for q in qm.queries], dtype=bool))
        if len(rows) < 4:
            raise ValueError(f"layer probe: {len(rows)} train queries; it needs more")
        m = qm.take(rows)
        correct = np.where(m.mask, (np.nan_to_num(m.performance) >= 0.5).astype(np.float64), np.nan)
        features = {}
        for k in self.candidates:
            enc = self.base.at_layer(k)
            features[k] = EmbeddingCache(dm.cache_dir, enc).embed(m.queries, show_progress=False)
        table, pick = probe(features, correct, m.tasks, m.models, self.pca_dim, self.criterion, self.min_class,
                            self.tie)
        meta = {"encoder": f"hf:{self.base.model}" + ("" if self.base.pool == "mean" else f":{self.base.pool}"),
                "model_dir": self.base.path, "pool": self.base.pool, "max_seq_length": self.base.max_seq_length,
                "criterion": self.criterion, "tie": self.tie, "pca_dim": self.pca_dim, "split": dm.split or "train",
                "queries": len(rows), "models": list(m.models), "data": dict(dm.data_config) or None,
                "picked_encoder": layer_name(self.base.model, pick, self.base.pool, self.base.max_seq_length),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if self.out_dir:
            self.artifacts = write_probe(table, pick, self.out_dir, meta)
            meta["run_dir"] = str(self.out_dir)
        if self.cache_pick:
            cache = probe_pick_path(self.base.path, self.base.pool).resolve()
            atomic_write(cache, json.dumps({**meta, "layer": pick}, indent=2, default=str))
            meta["cached_at"] = str(cache)
        best = next(r for r in table if r["layer"] == pick)
        self.summary_fields = {"probe": {"layer": pick, "encoder": meta["picked_encoder"], "criterion": self.criterion,
                                         self.criterion: best[self.criterion], "queries": len(rows),
                                         "cached_at": meta.get("cached_at"), "seconds": round(time.perf_counter() - t0, 2)}}
        return self.summary_fields
