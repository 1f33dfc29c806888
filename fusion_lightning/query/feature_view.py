"""Feature views: a router that reads only some parts of a concatenated encoder's vectors.

With `encoder=[minilm,hf:smollm2-135m@22]` every query vector is MiniLM's block beside SmolLM2's.
Which feature set routes best is a question for the log in front of us, like which architecture: so a
`router_auto` candidate may name the parts it reads (`features: minilm`, or a list), and selection
chooses among feature sets the way it chooses among architectures (`recipes/model/router_auto.yaml`).

A part is named as in the encoder spec (`minilm`, `hf:smollm2-135m@22`) or by the encoder's own name
(`all-MiniLM-L6-v2`); each is resolved by building the encoder, which for every encoder here reads
only its config, not its weights. The concatenation is L2-normalised as a whole, so a part's block is
its unit vector divided by sqrt(number of parts): a constant scale, which the routers learn through.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fusion_lightning.zoo  # noqa: F401  zoo names resolve in hf: specs
from fusion_lightning.data.embeddings import CONCAT, ConcatEncoder, build_encoder


def part_columns(encoder: str) -> dict[str, tuple[int, int]]:
    """Each part's name (as the built encoder names it) -> its [start, end) columns in the concatenation."""
    built = build_encoder(encoder)
    parts = built.parts if isinstance(built, ConcatEncoder) else [built]
    out, start = {}, 0
    for p in parts:
        out[p.name] = (start, start + int(p.dim))
        start += int(p.dim)
    return out


def view_columns(features: str | Sequence[str], encoder: str) -> list[int]:
    """The column indices of the named parts of `encoder`'s vectors, in the order named; ValueError naming
    the parts when one is not among them."""
    names = [features] if isinstance(features, str) else list(features)
    if not names:
        raise ValueError("features: name at least one part of the encoder")
    parts = part_columns(encoder)
    cols: list[int] = []
    for f in names:
        name = f if f in parts else build_encoder(f).name
        if name not in parts or CONCAT in name:
            raise ValueError(f"features: {f!r} is not a part of the encoder {encoder!r}; its parts: "
                             f"{', '.join(parts)}")
        cols.extend(range(*parts[name]))
    return cols


def view(x: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """`x` [..., D] restricted to `cols` (all of it for None)."""
    return x if cols is None else x.index_select(-1, cols.to(x.device))


def view_split(tensors: dict[str, torch.Tensor], cols: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A batch or split dict whose `x` is restricted to `cols` (the rest shared, not copied)."""
    return tensors if cols is None else {**tensors, "x": view(tensors["x"], cols)}
