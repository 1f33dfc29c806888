"""The cascade's data: the router batches plus each (query, model)'s logged response, embedded.

The cascade's answer-quality scorer reads the query and a model's response, so the DataModule
embeds every logged response with the query encoder (through the same embedding cache) and adds
`resp` [N, M, D] (zeros where the log has no response) and `resp_mask` [N, M] to each split.
"""

from __future__ import annotations

import numpy as np
import torch

from fusion_lightning.data.arrow import as_objects, codes
from fusion_lightning.data.embeddings import build_encoder, embed_texts
from fusion_lightning.data.logtable import LogTable
from fusion_lightning.query.datamodule import RouterDataModule


def response_matrix(logs: LogTable, models: list[str]) -> tuple[list, np.ndarray]:
    """(query ids, [Q, M] response texts, None where the log has none), in `logs.matrix()`'s query order."""
    t = logs.table
    qi, query_ids = codes(t["query_id"])
    col = {m: i for i, m in enumerate(models)}
    mcode, model_values = codes(t["model"])
    mi = np.array([col.get(m, -1) for m in model_values], np.int64)[mcode]
    out = np.full((len(query_ids), len(models)), None, dtype=object)
    keep = mi >= 0
    out[qi[keep], mi[keep]] = as_objects(t["response"])[keep]
    return list(query_ids), out


class CascadeDataModule(RouterDataModule):
    """RouterDataModule + the embedded logged responses (`resp`, `resp_mask`) in every split."""

    def prepare_texts(self) -> list[str]:
        """The queries and descriptions, then every logged response: the embed job encodes them all once."""
        return super().prepare_texts() + [r for r in as_objects(self.logs.table["response"]) if r is not None]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.logs.bandit:  # before the embeddings: nothing to replay
            raise ValueError(f"the cascade is evaluated offline by replaying every model's logged answer along its "
                             f"chain, and this is a bandit log ({self.logs.shape.reason}): use a full-information log")
        super().setup(stage)
        models = list(self.matrices["train"].models)
        ids, texts = response_matrix(self.logs, models)
        has = np.vectorize(lambda r: r is not None, otypes=[bool])(texts) if texts.size else np.zeros(texts.shape, bool)
        if not has.any():
            fmt, resp = self.data_config.get("format"), self.data_config.get("responses")
            raise ValueError(f"the cascade scores logged responses, but this log (data.format={fmt}, data.responses="
                             f"{resp}) has none: use a log with response texts (e.g. data=routellm, data=synthetic)")
        uniq = list(dict.fromkeys(texts[has].tolist()))
        index = {r: i for i, r in enumerate(uniq)}
        emb = torch.from_numpy(embed_texts(uniq, build_encoder(self.encoder_name), self.cache_dir)).half()
        row_of = {q: i for i, q in enumerate(ids)}
        n_calls = missing = 0
        for split, m in self.matrices.items():
            rows = np.array([row_of[q] for q in m.query_ids], np.int64)
            idx = torch.tensor([[index[r] if r is not None else -1 for r in texts[i]] for i in rows],
                               dtype=torch.long).reshape(len(rows), len(models))
            logged = torch.from_numpy(m.mask)
            n_calls += int(logged.sum())
            missing += int((logged & (idx < 0)).sum())
            resp = emb[idx.clamp_min(0)] * (idx >= 0)[..., None].half()
            self.splits[split].tensors["resp"] = resp  # [N, M, D] float16: the largest tensor of the cascade
            self.splits[split].tensors["resp_mask"] = (idx >= 0) & logged
        if missing:
            self.logs.report.notes.append(f"cascade: {missing:,} of {n_calls:,} logged calls have no response text; "
                                          "the cascade cannot score them and skips those models on those queries")
