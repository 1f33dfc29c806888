"""Retrieval metrics per query row (torchmetrics' functional retrieval metrics), the outcome of what
is retrieved (`outcome_at_k`), plus BM25 scores.

`scores`, `relevant` (bool), `gains` (graded relevance) are [queries, templates]; `-inf` scores
(excluded templates: the query's own, other tasks under the task filter) are never retrieved.
Recall@k is torchmetrics' (relevant retrieved in the top k / all relevant).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics.functional.retrieval import (
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

_TOKEN = re.compile(r"\w+")


def retrieval_metrics(scores: torch.Tensor, relevant: torch.Tensor, gains: torch.Tensor,
                      ks: Sequence[int] = (3,)) -> dict[str, torch.Tensor]:
    """Mean over query rows of recall@k, mrr and ndcg@k; rows with no relevant template are skipped."""
    out: dict[str, list[torch.Tensor]] = {"mrr": [], **{f"recall@{k}": [] for k in ks},
                                          **{f"ndcg@{k}": [] for k in ks}}
    for s, r, g in zip(scores.float(), relevant.bool(), gains.float(), strict=True):
        keep = torch.isfinite(s)
        s, r, g = s[keep], r[keep], g[keep].clamp_min(0)
        if not r.any():
            continue
        out["mrr"].append(retrieval_reciprocal_rank(s, r))
        for k in ks:
            out[f"recall@{k}"].append(retrieval_recall(s, r, top_k=k))
            out[f"ndcg@{k}"].append(retrieval_normalized_dcg(s, g, top_k=k))
    return {name: torch.stack(v).mean() if v else torch.tensor(float("nan")) for name, v in out.items()}


def outcome_at_k(scores: torch.Tensor, outcome: torch.Tensor, ks: Sequence[int] = (3,)) -> dict[str, torch.Tensor]:
    """`outcome@k`: the mean over query rows of the mean `outcome` (the logged score, on that query, of the
    models whose answers a template was built from; NaN: unknown) of the top-k retrieved templates.
    `-inf` scores are never retrieved; a row whose retrieved templates are all unknown is skipped."""
    out: dict[str, list[float]] = {f"outcome@{k}": [] for k in ks}
    for s, o in zip(scores.float(), outcome.float(), strict=True):
        keep = torch.isfinite(s)
        s, o = s[keep], o[keep]
        for k in ks:
            top = o[torch.topk(s, min(k, len(s))).indices] if len(s) else o[:0]
            top = top[~torch.isnan(top)]
            if len(top):
                out[f"outcome@{k}"].append(float(top.mean()))
    return {name: torch.tensor(sum(v) / len(v) if v else float("nan")) for name, v in out.items()}


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def bm25_scores(queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
    """[queries, documents] Okapi BM25 scores (rank-bm25, default k1/b)."""
    from rank_bm25 import BM25Okapi

    bm25 = BM25Okapi([tokenize(d) or ["<empty>"] for d in documents])
    return np.stack([bm25.get_scores(tokenize(q)) for q in queries]).astype(np.float32) if queries else \
        np.zeros((0, len(documents)), np.float32)
