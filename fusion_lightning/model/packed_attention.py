"""Attention for packed SFT sequences at the cost of their examples, not of the whole packed window.

A packed sequence holds several examples back to back; `collate` gives it restarting position ids and
a block-diagonal causal mask. Stock SDPA with that dense (W × W) mask computes every block of the
window — most of them masked — so a 1024-token window holding four 256-token examples pays
1024² instead of 4 · 256² attention work. `packed_sdpa` runs SDPA once per example with
`is_causal=True` (no mask tensor, the fast kernel), which is exactly the block-diagonal causal
attention. It is registered with transformers' AttentionInterface as `sdpa_packed`, a drop-in for
`sdpa`: a batch without `packed_segments` goes through the stock SDPA path unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "sdpa_packed"


def segments_from_positions(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the lengths of its examples: a new example starts wherever the position id is 0.

    `collate` numbers a packed row's trailing padding as one more run (0, 1, 2, ...), so it is one
    segment too; padding is unlabelled and attends only to padding.
    """
    pos = position_ids.detach().cpu()
    out = []
    for row in pos:
        starts = torch.nonzero(row == 0).flatten().tolist() + [len(row)]
        if starts[0] != 0:
            raise ValueError("a packed row must start at position 0")
        out.append([b - a for a, b in zip(starts, starts[1:], strict=False)])
    return out


def packed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                packed_segments: list[list[int]] | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """(B, H, W, D) q/k/v -> (B, W, H, D) output, as transformers' sdpa_attention_forward."""
    if packed_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    rows = []
    for b, lens in enumerate(packed_segments):
        if sum(lens) != query.shape[2]:
            raise ValueError(f"packed segments of row {b} cover {sum(lens)} of {query.shape[2]} positions")
        q, k, v = query[b:b + 1].split(lens, dim=2), key[b:b + 1].split(lens, dim=2), value[b:b + 1].split(lens, dim=2)
        rows.append(torch.cat([F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout, scale=scaling,
                                                              is_causal=qi.shape[2] > 1)
                               for qi, ki, vi in zip(q, k, v, strict=True)], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
