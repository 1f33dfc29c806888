"""DistillDataModule: the top-k responses of the log as SFT batches for a student tokenizer."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from fusion_lightning.data.datamodule import LogDataModule
from fusion_lightning.data.select import SelectionConfig, SelectionReport, select_responses
from fusion_lightning.io import atomic_write
from fusion_lightning.model.sft import (
    LengthGroupedSampler,
    Tokenized,
    TruncationStats,
    collate,
    pack,
    tokenize_example,
)
from fusion_lightning.zoo import resolve


class DistillDataModule(LogDataModule):
    def __init__(self, data: dict | None = None, student: dict | None = None, selection: dict | None = None,
                 max_length: int = 512, batch_size: int = 8, packing: bool = False, group_by_length: bool = True,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(data)
        self.student_path = resolve((student or {}).get("name_or_path", "tiny-llama"))
        self.selection = SelectionConfig(**(selection or {}))
        self.max_length, self.batch_size, self.packing = max_length, batch_size, packing
        self.group_by_length, self.num_workers, self.seed = group_by_length, num_workers, seed
        self.examples: dict[str, list[Tokenized]] = {}
        self.reports: dict[str, SelectionReport] = {}
        self.truncation = TruncationStats()

    def setup(self, stage: str | None = None) -> None:
        if self.examples:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.student_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        for split in ("train", "val", "test"):
            chosen, report = select_responses(self.logs.select(split), self.selection)
            self.reports[split] = report
            stats = self.truncation if split == "train" else TruncationStats()
            self.examples[split] = [tokenize_example(self.tokenizer, e.query, e.response, self.max_length, stats)
                                    for e in chosen]
        if not self.examples["train"]:
            raise ValueError("selection kept no training example: relax selection (k, pool, min_judge, stop_at_zero)")
        for line in self.reports["train"].lines():
            print(line)
        t = self.truncation
        if t.prompt_truncated or t.response_truncated:
            print(f"truncated to {self.max_length} tokens: {t.response_truncated} responses, "
                  f"{t.prompt_truncated} prompts (of {t.examples} examples)")

    def model_kwargs(self) -> dict[str, Any]:
        return {"name_or_path": self.student_path}

    def _loader(self, split: str, train: bool) -> DataLoader:
        examples = self.examples[split]
        if not examples:
            raise ValueError(f"the {split} split has no selected examples")
        items = pack(examples, self.max_length) if self.packing else [[e] for e in examples]
        collate_fn = partial(collate, pad_id=self.tokenizer.pad_token_id)
        # A loader-owned generator: creating an iterator then draws its seed from it, not from the global RNG,
        # so a resumed run's dropout sees the same random stream as an uninterrupted one.
        generator = torch.Generator().manual_seed(self.seed)
        if train:  # our sampler shards itself across ranks (see LengthGroupedSampler); Lightning checkpoints
            # the loader's position and its order is a function of the epoch: a mid-epoch resume is exact
            lengths = [sum(len(e.input_ids) for e in seq) for seq in items]
            sampler = LengthGroupedSampler(lengths, self.batch_size, seed=self.seed, group=self.group_by_length)
            return StatefulDataLoader(items, batch_sampler=sampler, collate_fn=collate_fn,
                                      num_workers=self.num_workers, generator=generator)
        return DataLoader(items, batch_size=self.batch_size, collate_fn=collate_fn, num_workers=self.num_workers,
                          generator=generator)

    def summary(self) -> dict[str, int]:
        counts = super().summary()
        for split, ex in self.examples.items():
            counts[f"{split}_examples"] = len(ex)
        counts["train_queries_without_usable_response"] = self.reports["train"].no_usable_response
        counts["train_response_truncated"] = self.truncation.response_truncated
        counts["train_prompt_truncated"] = self.truncation.prompt_truncated
        counts["train_supervised_tokens"] = sum(e.supervised for e in self.examples.get("train", []))
        return counts

    def write_artifacts(self, run_dir: Path) -> dict[str, str]:
        out = super().write_artifacts(run_dir)
        path = Path(run_dir) / "selection_report.json"
        atomic_write(path, json.dumps({s: vars(r) for s, r in self.reports.items()}, indent=2))
        out["selection_report"] = str(path)
        return out
