"""Student: a LightningModule around any Hugging Face causal LM, LoRA (peft) or full fine-tuning.

The same module runs a tiny Llama on a laptop CPU and an 8B model under DeepSpeed ZeRO on a cluster;
precision and sharding come from the trainer and strategy presets, not from here. LoRA checkpoints
hold only the trainable (adapter) parameters.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from transformers import AutoModelForCausalLM

from fusion_lightning.model import packed_attention
from fusion_lightning.model.sft import IGNORE


class Student(L.LightningModule):
    def __init__(self, name_or_path: str, lora: dict[str, Any] | None = None, gradient_checkpointing: bool = False,
                 lr: float = 2e-4, weight_decay: float = 0.0, warmup_ratio: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.999), attn_implementation: str = "sdpa"):
        super().__init__()
        self.save_hyperparameters()
        # LoRA checkpoints drop the frozen base weights; loading checks the adapter keys itself
        self.strict_loading = lora is None
        # "sdpa" loads as `sdpa_packed`: stock SDPA, except that packed batches attend per example instead of
        # through a dense block-diagonal mask over the whole window (see model/packed_attention.py)
        # ("sdpa_dense": stock SDPA with the dense mask, for comparison)
        impl = {"sdpa": packed_attention.NAME, "sdpa_dense": "sdpa"}.get(attn_implementation, attn_implementation)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=torch.float32,
                                                          attn_implementation=impl)
        if lora:
            from peft import LoraConfig, get_peft_model

            cfg = dict(lora)
            cfg.setdefault("task_type", "CAUSAL_LM")
            self.model = get_peft_model(self.model, LoraConfig(**cfg))
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora:
                self.model.enable_input_require_grads()
        # from_pretrained returns the model in eval mode and Lightning (>= 2.2) keeps module modes as it finds
        # them: without this, training would run with dropout (LoRA's too) and gradient checkpointing disabled
        self.model.train()

    def forward(self, **batch: torch.Tensor):
        mask = batch.get("attention_mask")
        if (mask is not None and mask.ndim == 4 and "position_ids" in batch
                and self.model.config._attn_implementation == packed_attention.NAME):
            batch = {**batch, "packed_segments": packed_attention.segments_from_positions(batch["position_ids"])}
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = (batch["labels"] != IGNORE).sum()
        if n == 0:
            raise ValueError("a batch has no supervised token: nothing to learn from (check truncation)")
        return self(**batch).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.log("train/supervised_tokens", (batch["labels"] != IGNORE).sum().float(), reduce_fx="sum",
                 batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch), batch_size=len(batch["input_ids"]), sync_dist=True)

    def trainable_names(self) -> set[str]:
        return {f"model.{n}" for n, p in self.model.named_parameters() if p.requires_grad}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                betas=tuple(self.hparams.betas))
        ratio, total = self.hparams.warmup_ratio, 0

        def factor(step: int) -> float:
            """Linear warm-up over ceil(warmup_ratio * total) steps, then cosine decay to 0 (transformers'
            cosine schedule). The length is read at the first step, not here: reading
            `trainer.estimated_stepping_batches` now would build the train loader before Lightning restores
            its mid-epoch position, and Lightning then drops that position (Lightning issue #20550)."""
            nonlocal total
            if step == 0:
                return 0.0 if ratio > 0 else 1.0
            total = total or max(int(self.trainer.estimated_stepping_batches), 1)
            warmup = math.ceil(ratio * total)
            if step < warmup:
                return step / warmup
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

        # a function, not an object: LambdaLR keeps it out of its state_dict (checkpoints stay weights-only)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.lora:
            keep = self.trainable_names()
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["student"] = {"base": self.hparams.name_or_path, "lora": bool(self.hparams.lora)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.lora:
            missing = sorted(self.trainable_names() - set(checkpoint["state_dict"]))
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} adapter weight(s) of this student, e.g. "
                                 f"{missing[:3]}: it was saved from a different LoRA configuration")
