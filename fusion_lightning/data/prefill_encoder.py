"""Prefill-activation features: a causal LM's hidden states of a query, pooled, as the query's vector.

`encoder=hf:NAME[@LAYER][:POOL][+lenN]` (through `build_encoder`, like every encoder string):

- NAME: a zoo name (`smollm2-135m`, `gemma-3-270m`, `tiny-llama`; resolved by the zoo, fetched on first
  use), a local Hugging Face directory, or a model in the local HF cache;
- LAYER: the index into the model's `hidden_states` (0 = the token embeddings, L = the last layer,
  after the model's final norm; negative counts from L like Python). Without it, the layer the layer
  probe picked for this model and pool (see `probe_pick_path`), else the middle layer L // 2; a log
  line says which. The encoder's `name` (the cache key, what a router checkpoint stores) always holds
  the resolved, non-negative layer, so `build_encoder(enc.name)` rebuilds the same vectors whatever
  the probe cache says later;
- POOL: `mean` (default: the attention-masked mean over the text's tokens of each token's unit
  vector, special tokens such as a BOS left out) or `last` (the last non-pad token's state: what the
  model has read when it starts to answer);
- `+lenN`: at most N tokens (default 256, as the other encoders; longer texts are truncated).

The model runs only up to the layer asked for (the layers above it are dropped once loaded), with
explicit position ids from the attention mask, so left- and right-padded batches, and any batch size,
give the same vectors (within float rounding, ~1e-6). fp32 on the CPU; on a GPU the weights load in
bf16 (`dtype` to change it). Several layers of one model (the layer probe, or `hf:M@4&hf:M@8`) come
from one forward pass per batch: `encode_layers`.

Why `mean` averages unit token vectors: a few tokens of a text carry "massive activations" (in
SmolLM2-135M the first token's state at layer 15 has norm ~22,900, the others ~150; at layers 4-8 the
first delimiter tokens ~650 against ~90), so a plain mean is nearly the same vector for every query.
Measured on 600 LLMRouter train queries (a logistic regression per model, right vs wrong, 3-fold AUC
averaged over the 9 models, max 128 tokens): the plain mean gives 0.61-0.62 at layers 12-20, the mean of
unit token vectors 0.72-0.73 (MiniLM 0.71; the task alone 0.77).

Why the vectors are L2-normalised (the `Encoder` protocol) and not standardised: on the same
measurement, standardising each dimension on the train folds lowered the unit-token mean's AUC at
every layer (0.67-0.68 against 0.72-0.73; it only rescued the plain mean, to 0.69); every router here
reads unit rows (kNN's cosine, the MLPs' fixed input scale), and the concatenation of encoders (`a&b`)
weights each part equally only because each part is a unit vector. The probe's Fisher separability is
computed on the same unit rows the routers read.

This module imports nothing of the package (`embeddings.build_encoder` imports it lazily); zoo names
resolve through `register_model_resolver`, which `fusion_lightning.zoo` calls when it is imported (the
commands and the query level import it; in a script, `import fusion_lightning.zoo` first).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.cache import cache_root

log = logging.getLogger(__name__)

PREFIX = "hf:"
POOLS = ("mean", "last")
DEFAULT_MAX_SEQ_LENGTH = 256  # as the sentence encoders' default (data/embeddings.py)
_SPEC = re.compile(r"hf:(?P<name>.+?)(?:@(?P<layer>-?\d+))?(?::(?P<pool>mean|last))?")

_RESOLVERS: list[Callable[[str], str | None]] = []
_ANNOUNCED: set[tuple[str, str, int, str]] = set()  # (model, pool, layer, why): one log line per process


def register_model_resolver(resolver: Callable[[str], str | None]) -> None:
    """Add a name -> local directory resolver for `hf:NAME` (None: not one of its names)."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)


def resolve_model(name: str) -> str:
    """An existing local path as is; else the first registered resolver's directory (the zoo's); else the
    name unchanged (a model in the local Hugging Face cache)."""
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    for resolver in _RESOLVERS:
        found = resolver(name)
        if found:
            return str(found)
    return name


def is_prefill_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def parse_prefill_spec(spec: str) -> tuple[str, int | None, str]:
    """'hf:NAME[@LAYER][:POOL]' (options such as +lenN already split off) -> (NAME, LAYER or None, POOL)."""
    m = _SPEC.fullmatch(spec)
    if m is None or not m.group("name"):
        raise ValueError(f"encoder {spec!r}: expected hf:NAME[@LAYER][:POOL] (POOL: {' or '.join(POOLS)})")
    name = m.group("name")
    if re.search(r"(?::(?:mean|last)|@-?\d+)(?:@|:|$)", name):
        raise ValueError(f"encoder {spec!r}: the layer comes before the pool: hf:NAME@LAYER:POOL")
    layer = m.group("layer")
    return name, None if layer is None else int(layer), m.group("pool") or "mean"


def model_key(path: str) -> str:
    """A folder name per model directory: its base name + a hash of its real path (aliases of one zoo
    model resolve to one directory, so they share it)."""
    real = os.path.realpath(path) if Path(path).exists() else path
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(real.rstrip("/\\")).name or real).strip("._") or "model"
    return f"{base}-{hashlib.sha1(real.encode()).hexdigest()[:8]}"


def probe_pick_path(path: str, pool: str = "mean") -> Path:
    """Where the layer probe caches its pick for a model directory and pool, and where `hf:NAME` (no
    layer) looks for it: `<cache root>/layer_probe/<model key>/<pool>.json` (fusion_lightning.cache)."""
    return cache_root() / "layer_probe" / model_key(path) / f"{pool}.json"


def read_probe_pick(path: str, pool: str = "mean") -> dict[str, Any] | None:
    f = probe_pick_path(path, pool)
    try:
        pick = json.loads(f.read_text(encoding="utf-8"))
        int(pick["layer"])
        return pick
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("layer probe cache %s is unreadable (%s): ignored", f, e)
        return None


class PrefillEncoder:
    """Pooled hidden states of layer `layer` of the causal LM `model` (a zoo name or HF directory).

    Building one costs nothing: the name resolves (and the config is read) only where the layer is not
    given as a non-negative number, the weights load on first encode."""

    def __init__(self, model: str, layer: int | None = None, pool: str = "mean",
                 max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH, device: str = "cpu",
                 dtype: str | None = None, padding_side: str | None = None):
        if pool not in POOLS:
            raise ValueError(f"encoder hf:{model}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if max_seq_length is not None and int(max_seq_length) <= 0:
            raise ValueError(f"encoder hf:{model}: max_seq_length must be positive, got {max_seq_length}")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.model, self.pool, self.device = str(model), pool, device
        self.max_seq_length = int(max_seq_length or DEFAULT_MAX_SEQ_LENGTH)
        self.dtype, self.padding_side = dtype, padding_side
        self.max_batch_tokens = 8192  # padded tokens a forward pass holds at most (see token_batches)
        self._layer = layer if layer is not None and layer >= 0 else None
        self._given_layer = layer
        self._path: str | None = None
        self._config: Any = None
        self._model: Any = None
        self._tokenizer: Any = None
        self._kept_layers: int | None = None  # layers the loaded model still runs (None: all)
        self.layer_source = "given" if self._layer is not None else None

    # --- names and sizes, without the weights -------------------------------------------------------
    @property
    def path(self) -> str:
        if self._path is None:
            self._path = resolve_model(self.model)
        return self._path

    @property
    def config(self) -> Any:
        if self._config is None:
            from transformers import AutoConfig

            try:
                cfg = AutoConfig.from_pretrained(self.path, local_files_only=True)  # no hub here
            except OSError as e:
                raise ValueError(f"encoder hf:{self.model}: {self.model!r} is neither a local directory nor a zoo "
                                 f"model name (zoo names resolve once fusion_lightning.zoo is imported): {e}") from None
            self._config = getattr(cfg, "text_config", None) or cfg
        return self._config

    @property
    def num_layers(self) -> int:
        """L: `hidden_states` has L + 1 entries (0 = the token embeddings)."""
        return int(self.config.num_hidden_layers)

    @property
    def dim(self) -> int:
        return int(self.config.hidden_size)

    @property
    def layer(self) -> int:
        if self._layer is None:
            self._layer, self.layer_source = self._resolve_layer()
        return self._layer

    def _resolve_layer(self) -> tuple[int, str]:
        n = self.num_layers
        if self._given_layer is not None:  # negative: from the top
            layer = n + 1 + self._given_layer
            if not 0 <= layer <= n:
                raise ValueError(f"encoder hf:{self.model}@{self._given_layer}: the model has layers 0..{n}")
            return layer, "given"
        pick = read_probe_pick(self.path, self.pool)
        if pick is not None and 0 <= int(pick["layer"]) <= n:
            layer, why = int(pick["layer"]), f"the layer probe's pick ({probe_pick_path(self.path, self.pool)})"
        else:
            layer, why = n // 2, (f"the middle layer: no layer probe result at {probe_pick_path(self.path, self.pool)} "
                                  "(python -m fusion_lightning.fit recipe=layer_probe encoder=hf:NAME)")
        key = (self.path, self.pool, layer, why)
        if key not in _ANNOUNCED:
            _ANNOUNCED.add(key)
            log.warning("encoder hf:%s%s: layer %d of %d, %s", self.model,
                        "" if self.pool == "mean" else f":{self.pool}", layer, n, why)
        return layer, "probe" if pick is not None else "default"

    @property
    def name(self) -> str:
        """`hf:NAME@LAYER[:last][+lenN]`: the resolved layer, the pool only when not the default."""
        return layer_name(self.model, self.layer, self.pool, self.max_seq_length)

    @property
    def forward_key(self) -> tuple[str, int, str, str | None]:
        """Encoders with equal keys can share one forward pass (`encode_layers`)."""
        return (self.model, self.max_seq_length, self.device, self.dtype)

    def at_layer(self, layer: int, pool: str | None = None) -> PrefillEncoder:
        """The same model at another layer or pool (the name resolved and config read once; not the weights)."""
        other = PrefillEncoder(self.model, layer, pool or self.pool, self.max_seq_length, self.device, self.dtype,
                               self.padding_side)
        other._path, other._config, other.max_batch_tokens = self._path, self._config, self.max_batch_tokens
        return other

    # --- the model ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            if tok.pad_token is None:  # the attention mask decides what is read: any id pads
                tok.pad_token = tok.eos_token or tok.unk_token or tok.convert_ids_to_tokens(0)
            if self.padding_side is not None:
                tok.padding_side = self.padding_side
            self._tokenizer = tok
        return self._tokenizer

    def _load(self, up_to: int | None = None) -> Any:
        """The base model (no LM head), running layers up to `up_to` (default: this encoder's layer);
        an already loaded model is cut further when it runs more layers than needed, never grown."""
        import torch

        need = self.layer if up_to is None else int(up_to)
        if self._model is None:
            from transformers import AutoModel

            dtype = self.dtype or ("bfloat16" if str(self.device).startswith("cuda") else "float32")
            model = AutoModel.from_pretrained(self.path, dtype=getattr(torch, dtype), local_files_only=True)
            self._model = model.to(self.device).eval()
            self._kept_layers = None
        if self._kept_layers is not None and need > self._kept_layers:
            raise ValueError(f"encoder {self.name}: the loaded model was cut to {self._kept_layers} layers; "
                             f"layer {need} needs a fresh encoder")
        # hidden_states[k] of a model cut to k + 1 layers equals the full model's (the last entry is the
        # final-normed output, so k layers would not do); the top layer needs them all
        keep = need + 1 if need < self.num_layers else None
        layers = _decoder_layers(self._model)
        if keep is not None and layers is not None and len(layers) > keep:
            _set_decoder_layers(self._model, layers[:keep])
            self._kept_layers = keep
        return self._model

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        return self.encode_layers(texts, [(self.layer, self.pool)], batch_size, show_progress)[0]

    def encode_layers(self, texts: Sequence[str], outputs: Sequence[tuple[int, str]], batch_size: int = 64,
                      show_progress: bool = False) -> list[np.ndarray]:
        """[N, dim] L2-normalised float32 per (layer, pool) in `outputs`, all from one forward pass per batch."""
        import torch

        texts = list(texts)
        outs = [np.zeros((len(texts), self.dim), np.float32) for _ in outputs]
        for layer, pool in outputs:
            if not 0 <= layer <= self.num_layers or pool not in POOLS:
                raise ValueError(f"encoder hf:{self.model}: layer {layer} / pool {pool!r} out of 0..{self.num_layers} "
                                 f"/ {POOLS}")
        if not texts:
            return outs
        model = self._load(max(layer for layer, _ in outputs))
        device = next(model.parameters()).device
        tok = self.tokenizer
        lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=self.max_seq_length)["input_ids"]]
        steps: Any = token_batches(lengths, int(batch_size), self.max_batch_tokens)
        if show_progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc=f"embed hf:{self.model}", unit="batch")
        with torch.inference_mode():
            for idx in steps:
                enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_seq_length,
                          return_tensors="pt", return_special_tokens_mask=True)
                mask = enc["attention_mask"].to(device)
                if mask.shape[1] == 0 or not bool(mask.any()):
                    continue  # only empty texts: zero rows
                ids = enc["input_ids"].to(device)
                special = enc["special_tokens_mask"].to(device).bool()
                # positions from the mask: a left-padded row's first token is at position 0 too
                pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
                hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                               output_hidden_states=True).hidden_states
                for j, (layer, pool) in enumerate(outputs):
                    v = pool_hidden(hidden[layer], mask, special, pool)
                    outs[j][idx] = v.cpu().numpy()
        return outs


def token_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices by length (then position), cut into batches of at most `batch_size` rows and, past a
    batch's first row, at most `max_tokens` padded tokens: every layer's hidden states of a batch are
    kept at once (`output_hidden_states`), so a serving call's batch of 256 long prompts must not be
    one forward pass."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            last = batches[-1]
            if len(last) < max(1, batch_size) and (len(last) + 1) * max(lengths[i], 1) <= max_tokens:
                last.append(i)
                continue
        batches.append([i])
    return batches


def pool_hidden(h: Any, mask: Any, special: Any, pool: str) -> Any:
    """[B, T, D] hidden states -> [B, D] unit rows (float32). mean: the mean of the attended non-special
    tokens' unit vectors (all attended ones where a text is only special tokens); last: the last
    attended token. Rows with no token are zero. Pad positions are never multiplied in (their states may
    be anything, NaN included)."""
    import torch

    h = h.float()
    if pool == "mean":  # each token's direction weighs the same (see the module docstring: massive activations)
        h = torch.nn.functional.normalize(h, dim=-1)
    attended = mask.bool()
    if pool == "last":
        t = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(attended, t, -1).max(dim=1).values
        v = h[torch.arange(h.shape[0], device=h.device), last.clamp(min=0)]
    else:
        keep = attended & ~special
        keep = torch.where(keep.any(dim=1, keepdim=True), keep, attended)
        v = torch.where(keep[..., None], h, 0.0).sum(dim=1) / keep.sum(dim=1, keepdim=True).clamp(min=1)
    v = torch.where(attended.any(dim=1, keepdim=True), v, 0.0)
    return torch.nn.functional.normalize(v, dim=-1)


def layer_name(model: str, layer: int, pool: str = "mean", max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH) -> str:
    return (f"{PREFIX}{model}@{int(layer)}" + ("" if pool == "mean" else f":{pool}")
            + ("" if max_seq_length == DEFAULT_MAX_SEQ_LENGTH else f"+len{max_seq_length}"))


def _decoder_layers(model: Any) -> Any:
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "model"):
        layers = getattr(model.model, "layers", None)
    return layers


def _set_decoder_layers(model: Any, layers: Any) -> None:
    import torch

    owner = model if hasattr(model, "layers") else model.model
    owner.layers = torch.nn.ModuleList(list(layers))


def encode_group(encoders: Sequence[PrefillEncoder], texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
    """Each encoder's vectors of `texts`, from one forward pass per batch of the first one's model (the
    encoders must share its `forward_key`: one model, length and device)."""
    first = encoders[0]
    if any(e.forward_key != first.forward_key for e in encoders):
        raise ValueError("encode_group: the encoders must share one model, max_seq_length and device")
    return first.encode_layers(texts, [(e.layer, e.pool) for e in encoders], batch_size=batch_size)
