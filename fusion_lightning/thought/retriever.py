"""The template retriever: a bi-encoder LightningModule trained with InfoNCE, and exact top-k search.

Two ways to train, one interface (`encode_queries`, `encode_templates`):
- `mode: auto` (the default) is `head` for the weightless `hashing` encoder, else `finetune`;
- `mode: finetune`: the query encoder (packaged MiniLM, or any HF encoder) fine-tuned
  end to end, mean-pooled and L2-normalised like sentence-transformers, shared by queries and templates;
- `mode: head`: frozen embeddings of any `build_encoder` name (e.g. `hashing` for CPU tests) with
  a trainable linear map per side, initialised to the identity, so step 0 equals the frozen encoder.
Loss: InfoNCE over each query's positive vs. in-batch positives of other queries and hard negatives
(templates that are positives of the query itself are masked out, not counted as negatives), plus,
with `distill_weight` > 0, a listwise distillation term: the student's softmax over the batch's
templates is fitted to a softmax of their graded relevance on train queries (the similarity of each
template's closest source query, as in evaluation; the row's own templates left out).
Evaluation: trained vs frozen vs BM25 on the same rows (see `TemplateDataModule`): recall@k, MRR and
nDCG@k against source-query similarity (diagnostics), and `outcome@k`, the logged score on the query of
the models behind the top-k templates (what the datamodule's `objective: outcome` trains for; the
template_retriever recipe early-stops on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion_lightning.data.embeddings import build_encoder
from fusion_lightning.data.encoders import resolve_pretrained
from fusion_lightning.thought.metrics import outcome_at_k, retrieval_metrics

MODES = ("auto", "finetune", "head")


class TemplateRetriever(L.LightningModule):
    def __init__(self, encoder: str = "minilm", mode: str = "auto", max_length: int = 128,
                 temperature: float = 0.05, lr: float = 2e-5, head_lr: float = 1e-3, weight_decay: float = 0.01,
                 ks: Sequence[int] = (1, 3, 5), encode_batch_size: int = 128, distill_weight: float = 0.0,
                 teacher_temperature: float = 0.02):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"model.mode={mode!r}; choose from: {', '.join(MODES)}")
        if mode == "auto":  # an encoder without weights (hashing) can only be frozen
            mode = "head" if str(encoder).startswith("hashing") else "finetune"
        self.save_hyperparameters()  # with the resolved mode
        self.ks = tuple(int(k) for k in ks)
        if mode == "finetune":
            from transformers import AutoModel, AutoTokenizer

            if str(encoder).startswith("hashing"):
                raise ValueError(f"the {encoder!r} encoder has no weights to fine-tune; use model.mode=head with it "
                                 "(linear heads over its frozen embeddings) or a transformer encoder such as minilm")
            path = resolve_pretrained(encoder)
            self.backbone = AutoModel.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        else:
            self.frozen = build_encoder(encoder)
            d = self.frozen.dim
            self.q_head, self.t_head = nn.Linear(d, d), nn.Linear(d, d)
            for head in (self.q_head, self.t_head):
                nn.init.eye_(head.weight)
                nn.init.zeros_(head.bias)
            self._memo: dict[str, np.ndarray] = {}
        self._eval: list[tuple[torch.Tensor, ...]] = []
        self._index: torch.Tensor | None = None

    # -- encoding ------------------------------------------------------------------------------
    def _frozen(self, texts: Sequence[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if new:
            self._memo.update(zip(new, self.frozen.encode(new), strict=True))
        return torch.from_numpy(np.stack([self._memo[t] for t in texts])).to(self.device)

    def _embed(self, texts: Sequence[str], side: str) -> torch.Tensor:
        if self.hparams.mode == "head":
            x = self._frozen(texts)
            return F.normalize((self.q_head if side == "query" else self.t_head)(x), dim=-1)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.hparams.max_length,
                             return_tensors="pt").to(self.device)
        h = self.backbone(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return F.normalize((h * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)

    @torch.no_grad()
    def _encode(self, texts: Sequence[str], side: str) -> torch.Tensor:
        was = self.training
        self.eval()
        bs = self.hparams.encode_batch_size
        out = [self._embed(texts[i:i + bs], side) for i in range(0, len(texts), bs)]
        self.train(was)
        return torch.cat(out) if out else torch.zeros(0, 1)

    def encode_queries(self, texts: Sequence[str]) -> torch.Tensor:
        return self._encode(list(texts), "query")

    def encode_templates(self, texts: Sequence[str]) -> torch.Tensor:
        return self._encode(list(texts), "template")

    # -- training ------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self._embed(batch["query"], "query")
        docs = self._embed(batch["positive"] + batch["negatives"], "template")
        scores = (q @ docs.T) / self.hparams.temperature
        logits = scores.masked_fill(batch["mask"].to(self.device), float("-inf"))
        loss = F.cross_entropy(logits, torch.arange(len(q), device=self.device))
        w = self.hparams.distill_weight
        if w and "gains" in batch:
            # listwise distillation of the graded relevance: the batch's templates (the row's own ones,
            # never in its evaluation index, left out) ranked like the similarity of their source query
            own = batch["own"].to(self.device)
            target = (batch["gains"].to(self.device) / self.hparams.teacher_temperature).masked_fill(own, float("-inf"))
            student = scores.masked_fill(own, float("-inf"))
            keep = torch.isfinite(target).any(1)
            p = target[keep].softmax(-1)
            logq = student[keep].log_softmax(-1).masked_fill(own[keep], 0.0)
            distill = -(p * logq).sum(-1).mean()
            self.log("train/distill", distill, batch_size=len(q))
            loss = loss + w * distill
        self.log("train/loss", loss, prog_bar=True, batch_size=len(q))
        return loss

    # -- evaluation: trained vs frozen vs BM25 on the same rows --------------------------------
    def _start_eval(self) -> None:
        self._eval = []
        self._index = self.encode_templates(self.trainer.datamodule.index_texts)

    def _eval_step(self, batch: dict) -> None:
        scores = self.encode_queries(batch["query"]) @ self._index.T
        self._eval.append((scores.cpu(), batch["frozen"], batch["bm25"], batch["exclude"], batch["relevant"],
                           batch["gains"], batch["outcome"]))

    def _end_eval(self, stage: str) -> None:
        if not self._eval:
            return
        trained, frozen, bm25, exclude, relevant, gains, outcome = (torch.cat(x) for x in zip(*self._eval, strict=True))
        for name, s in (("", trained), ("frozen/", frozen), ("bm25/", bm25)):
            masked = s.masked_fill(exclude, float("-inf"))
            metrics = {**retrieval_metrics(masked, relevant, gains, self.ks), **outcome_at_k(masked, outcome, self.ks)}
            for metric, value in metrics.items():
                self.log(f"{stage}/{name}{metric}", value, prog_bar=(not name and metric in ("ndcg@3", "outcome@3")))
        self._eval = []

    def on_validation_epoch_start(self) -> None:
        self._start_eval()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def configure_optimizers(self):
        if self.hparams.mode == "head":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.head_lr, weight_decay=self.hparams.weight_decay)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class TemplateIndex:
    """Exact inner-product top-k over unit template vectors in torch, with an optional task filter."""

    def __init__(self, vectors: torch.Tensor | np.ndarray, tasks: Sequence[str]):
        self.vectors = torch.as_tensor(np.asarray(vectors, np.float32) if isinstance(vectors, np.ndarray) else vectors,
                                       dtype=torch.float32).contiguous()
        self.task_names = sorted(set(tasks))
        code = {t: i for i, t in enumerate(self.task_names)}
        self.task_codes = torch.tensor([code[t] for t in tasks], dtype=torch.long)
        self._parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _part(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and vectors of one task, contiguous: a task-filtered search multiplies only these."""
        if c not in self._parts:
            rows = torch.nonzero(self.task_codes == c).flatten()
            self._parts[c] = (rows, self.vectors[rows].contiguous())
        return self._parts[c]

    def search(self, queries: torch.Tensor, k: int, tasks: Sequence[str | None] | None = None,
               batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, indices), each [n, k]. With `tasks`, a query whose task the library has is searched
        against that task's templates only (fewer than k of them: -inf / -1 padding); None or an
        unknown task searches everything."""
        k = min(k, len(self.vectors))
        code = {t: i for i, t in enumerate(self.task_names)}
        qcodes = [code.get(t, -1) if t else -1 for t in tasks] if tasks is not None else [-1] * len(queries)
        scores = torch.full((len(queries), k), float("-inf"))
        indices = torch.full((len(queries), k), -1, dtype=torch.long)
        queries = torch.as_tensor(queries, dtype=torch.float32)
        with torch.inference_mode():
            buf = torch.empty(0)
            for c in sorted(set(qcodes)):
                sel = torch.tensor([i for i, x in enumerate(qcodes) if x == c], dtype=torch.long)
                rows, vecs = (None, self.vectors) if c == -1 else self._part(c)
                kk = min(k, len(vecs))
                if buf.numel() < min(batch_size, len(sel)) * len(vecs):
                    buf = torch.empty(min(batch_size, len(sel)) * len(vecs))
                for s in range(0, len(sel), batch_size):
                    part = sel[s:s + batch_size]
                    # one reused [batch, templates] score buffer: no 100s-of-MB allocation per batch
                    out = buf[: len(part) * len(vecs)].view(len(part), len(vecs))
                    top = torch.topk(torch.mm(queries[part], vecs.T, out=out), kk, dim=1)
                    scores[part, :kk] = top.values
                    indices[part, :kk] = top.indices if rows is None else rows[top.indices]
        return scores, indices
