"""Encoder-classifier router: the query encoder (MiniLM by default) fine-tuned end to end with per-model heads.

Unlike the routers over frozen embeddings, batches carry token ids (`x` = input ids, padding 0),
so the DataModule tokenizes instead of embedding, and routing tokenizes the new queries itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from fusion_lightning.data.encoders import resolve_pretrained
from fusion_lightning.query.base import LogitRouter
from fusion_lightning.query.datamodule import RouterDataModule


class EncoderRouterDataModule(RouterDataModule):
    """RouterDataModule whose `x` is token ids of the query (for end-to-end fine-tuning)."""

    def __init__(self, *args, pretrained: str = "minilm", max_length: int = 128, **kwargs):
        kwargs.setdefault("encoder", pretrained)
        super().__init__(*args, **kwargs)
        self.pretrained, self.max_length = pretrained, max_length

    def features(self, texts: list[str]) -> torch.Tensor:
        self.encoder_id = self.pretrained
        tok = AutoTokenizer.from_pretrained(resolve_pretrained(self.pretrained))
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"]

    def model_kwargs(self) -> dict:
        return {**super().model_kwargs(), "pretrained": self.pretrained, "max_length": self.max_length}


class EncoderRouter(LogitRouter):
    """Mean-pooled transformer encoder + task embedding -> performance logits and cost per model."""

    def __init__(self, embed_dim: int, models: list[str], tasks: list[str], binary: bool, encoder: str,
                 normaliser: dict, model_sizes: list[float | None], pretrained: str = "minilm",
                 max_length: int = 128, task_embedding_dim: int = 32, dropout: float = 0.1, lr: float = 3e-5,
                 head_lr: float = 1e-3, weight_decay: float = 0.01, cost_loss_weight: float = 0.5,
                 lam: float = 0.0, task_prior: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.path = resolve_pretrained(pretrained)
        self.encoder = AutoModel.from_pretrained(self.path)
        hidden = self.encoder.config.hidden_size
        self.task_emb = nn.Embedding(len(tasks), task_embedding_dim) if task_embedding_dim else None
        d = hidden + (task_embedding_dim or 0)
        self.dropout = nn.Dropout(dropout)
        self.perf_head = nn.Linear(d, len(models))
        self.cost_head = nn.Linear(d, len(models))
        self._tokenizer = None

    def forward(self, ids: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (ids != 0).long()
        h = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (h * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        if self.task_emb is not None:
            pooled = torch.cat([pooled, self.task_emb(task)], dim=-1)
        pooled = self.dropout(pooled)
        return self.perf_head(pooled), self.cost_head(pooled)

    def featurize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids for new queries (the Route API calls this instead of an embedding encoder)."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        enc = self._tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.hparams.max_length, return_tensors="pt")
        return enc["input_ids"]

    def configure_optimizers(self):
        heads = [p for n, p in self.named_parameters() if not n.startswith("encoder.")]
        return torch.optim.AdamW([
            {"params": self.encoder.parameters(), "lr": self.hparams.lr},
            {"params": heads, "lr": self.hparams.head_lr},
        ], weight_decay=self.hparams.weight_decay)
