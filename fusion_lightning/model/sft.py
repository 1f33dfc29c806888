"""SFT examples for the student: chat formatting, response-only labels, truncation, batching and packing.

Loss is on the response tokens only (prompt tokens are labelled -100). Every example must keep at
least one supervised token after truncation; a batch without one is an error, not a silent zero loss.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Sampler

IGNORE = -100
PLAIN_PROMPT = "### Question:\n{query}\n\n### Answer:\n"


@dataclass
class Tokenized:
    input_ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class TruncationStats:
    examples: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0


def format_example(tokenizer, query: str, response: str) -> tuple[str, str]:
    """(prompt text, response text) in the tokenizer's chat template, or a plain format without one."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                               add_generation_prompt=True)
        full = tokenizer.apply_chat_template([{"role": "user", "content": query},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, response + (tokenizer.eos_token or "")  # templates that re-render the prompt
    return PLAIN_PROMPT.format(query=query), response + (tokenizer.eos_token or "")


def tokenize_example(tokenizer, query: str, response: str, max_length: int, stats: TruncationStats) -> Tokenized:
    """Prompt ids labelled IGNORE + response ids; truncate the response first, then the prompt's start."""
    prompt, answer = format_example(tokenizer, query, response)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    r = tokenizer(answer, add_special_tokens=False)["input_ids"]
    stats.examples += 1
    if len(p) + len(r) > max_length:
        keep_r = max(min(len(r), max_length // 2), max_length - len(p))  # at least half the window for the answer
        if keep_r < len(r):
            stats.response_truncated += 1
            r = r[:keep_r]
        if len(p) + len(r) > max_length:
            stats.prompt_truncated += 1
            p = p[len(p) + len(r) - max_length:]
    if not r:
        raise ValueError(f"example with an empty response after tokenization (query {query[:60]!r})")
    return Tokenized(p + r, [IGNORE] * len(p) + r)


def pack(examples: Sequence[Tokenized], max_length: int) -> list[list[Tokenized]]:
    """Greedy first-fit packing of examples (longest first) into sequences of at most max_length tokens."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[Tokenized]] = []
    room: list[int] = []
    for i in order:
        n = len(examples[i].input_ids)
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(examples[i])
                room[b] -= n
                break
        else:
            bins.append([examples[i]])
            room.append(max_length - n)
    return bins


def collate(items: Sequence[list[Tokenized]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch. Each item is one sequence of 1+ examples; packed examples get restarting
    position ids and a block-diagonal causal mask, so they never attend to each other."""
    lengths = [sum(len(e.input_ids) for e in seq) for seq in items]
    width = max(lengths)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(items), width), dtype=torch.long)
    packed = any(len(seq) > 1 for seq in items)
    mask = torch.zeros((len(items), 1, width, width), dtype=torch.bool) if packed else torch.zeros(
        (len(items), width), dtype=torch.long)
    for b, seq in enumerate(items):
        start = 0
        for e in seq:
            n = len(e.input_ids)
            ids[b, start:start + n] = torch.tensor(e.input_ids)
            labels[b, start:start + n] = torch.tensor(e.labels)
            pos[b, start:start + n] = torch.arange(n)
            if packed:
                mask[b, 0, start:start + n, start:start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
            else:
                mask[b, start:start + n] = 1
            start += n
        if packed and start < width:  # padding rows attend to themselves only (keeps softmax finite)
            idx = torch.arange(start, width)
            mask[b, 0, idx, idx] = True
            # numbered as one more run, so restarting positions mark every example (and the padding) as a
            # segment: the `sdpa_packed` attention (model/packed_attention.py) reads them from position_ids
            pos[b, start:] = torch.arange(width - start)
    if not (labels != IGNORE).any():
        raise ValueError("a batch has no supervised token (every label is masked): check truncation settings")
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length (so padding stays small), in a seeded random order each epoch.

    `group=False` gives plain shuffled batches. Under DDP/DeepSpeed each rank takes every
    world_size-th batch (the last few batches are dropped so every rank steps equally often): the
    recipe sets `trainer.use_distributed_sampler: false`, since Lightning cannot shard a batch sampler.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega: int = 50, group: bool = True):
        self.lengths, self.batch_size, self.seed, self.mega = np.asarray(lengths), batch_size, seed, mega
        self.group = group
        self.epoch = 0
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler` each epoch (also after a resume):
        # pointing it at ourselves keeps the batch order a function of the epoch, as in an uninterrupted run
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        perm = rng.permutation(len(self.lengths))
        group = self.batch_size * self.mega
        batches = []
        for g in range(0, len(perm), group):
            chunk = perm[g:g + group]
            if self.group:
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        rank, world = _rank_world()
        usable = len(batches) // world * world if world > 1 else len(batches)
        return batches[rank:usable:world]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()
        self.epoch += 1

    def __len__(self) -> int:
        group = self.batch_size * self.mega  # full groups give `mega` batches each
        rest = len(self.lengths) % group
        n = len(self.lengths) // group * self.mega + (rest + self.batch_size - 1) // self.batch_size
        return n // _rank_world()[1]


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
