"""A sentence-transformers model run by ONNX Runtime: the fast CPU path (`encoder=minilm+onnx-int8`).

Why not sentence-transformers' own `backend="onnx"`: it loads through optimum-onnx, whose releases pin
transformers < 4.58 while this project runs transformers 5, so installing it would downgrade the
library every other part of the project uses. The export here is what that backend does, with the
tools already at hand: `torch.onnx.export` of the model's transformer (eager attention), ONNX
Runtime's BERT graph fusions (attention, GELU, layer norm) where the architecture has them, and for
int8 ONNX Runtime's dynamic quantisation with per-channel weight scales (per-tensor scales lose too
much here: mean cosine 0.95 against fp32 on the LLMRouter queries, per-channel 0.993). The
sentence-transformers modules after the transformer (pooling, dense, normalise) run as usual on its
token embeddings, so any model's own pooling is kept.

Exports happen once, offline, from the local weights (the packaged MiniLM), under
`<cache root>/onnx/<model>/` (fusion_lightning.cache), behind a file lock so concurrent ranks export once.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fusion_lightning.cache import cache_root
from fusion_lightning.data.encoders import (
    DEFAULT_MAX_SEQ_LENGTH,
    SentenceTransformerEncoder,
    encoder_dir_name,
    l2_normalise,
)
from fusion_lightning.io import file_lock

_BERT_LIKE = ("bert", "roberta", "distilbert", "mpnet", "xlm-roberta", "electra")  # ORT's fusion model types


def onnx_cache_root() -> Path:
    return cache_root() / "onnx"


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("the +onnx encoders need ONNX Runtime: pip install 'fusion_lightning[onnx]' "
                          "(onnxruntime and onnx)") from e
    return onnxruntime


def quantize_int8(fp32: str | Path, out: str | Path, keep_fp32: Sequence[str] = ()) -> Path:
    """ONNX Runtime's dynamic int8 quantisation of the fp32 export, per-channel weight scales; the nodes
    named in `keep_fp32` stay fp32 (bench/int8_agreement.py measures which buy back agreement)."""
    _require_onnxruntime()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if keep_fp32:  # (the export's own call keeps none: no second load of the graph for it)
        missing = set(keep_fp32) - {n.name for n in onnx.load(str(fp32)).graph.node}
        if missing:
            raise ValueError(f"quantize_int8: {fp32} has no node(s) {sorted(missing)} to keep fp32")
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.onnx")
    # the fused ops are ORT's own domain: shape inference cannot type their outputs, they are float
    quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True,
                     nodes_to_exclude=list(keep_fp32), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    os.replace(tmp, out)
    return out


def length_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[np.ndarray]:
    """Indices grouped longest first: each batch at most `batch_size` rows and, past its first row, at
    most `max_tokens` padded tokens (rows × its longest row).

    Why: a batch runs at the width of its longest text, and attention costs grow faster than the width.
    The serve path encodes a routing batch of up to 64 new prompts in one call; on the LLMRouter log one
    batch of 64 (most prompts ~40 tokens, one at the 256-token cap) cost 40–54 ms a query, batches
    capped at 512–1,024 padded tokens 11–12 ms, and single rows about the same: on a CPU a bigger batch
    buys little and padding costs a lot."""
    order = np.argsort([-n for n in lengths], kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)
        rows = max(1, min(batch_size, max_tokens // width))
        batches.append(order[start:start + rows])
        start += rows
    return batches


class OnnxEncoder:
    """The sentence-transformers model `name_or_path` through ONNX Runtime (fp32, or int8 with `quantize`).

    `name` (the cache key) is the torch encoder's name + "+onnx" / "+onnx-int8": int8 vectors differ
    from fp32 ones (cosine ≈ 0.99), so they never share a cache entry."""

    def __init__(self, name_or_path: str | None = None, quantize: bool = False,
                 max_seq_length: int | None = DEFAULT_MAX_SEQ_LENGTH, threads: int | None = None,
                 export_dir: str | Path | None = None, max_batch_tokens: int = 1024):
        self.torch_encoder = SentenceTransformerEncoder(name_or_path, max_seq_length=max_seq_length)
        self.quantize = quantize
        suffix = "+onnx-int8" if quantize else "+onnx"
        base = self.torch_encoder.base_name
        self.name = base + suffix + ("" if self.torch_encoder.name == base else self.torch_encoder.name[len(base):])
        self.max_seq_length = max_seq_length
        self.threads = threads
        self.max_batch_tokens = max_batch_tokens
        self.export_dir = Path(export_dir) if export_dir else onnx_cache_root() / encoder_dir_name(base)
        self.device = "cpu"
        self.auto = False  # built for a name without a backend option (build_encoder): torch may stand in
        self._session: Any = None

    @property
    def dim(self) -> int:
        return self.torch_encoder.dim

    @property
    def tokenizer(self) -> Any:
        return self.torch_encoder.tokenizer

    @property
    def model_file(self) -> Path:
        return self.export_dir / ("model_int8.onnx" if self.quantize else "model.onnx")

    def export(self) -> Path:
        """The .onnx file, exported (and quantised) on first use; later calls and processes reuse it."""
        if self.model_file.is_file():
            return self.model_file
        with file_lock(self.export_dir / ".export.lock"):
            fp32 = self.export_dir / "model.onnx"
            if not fp32.is_file():
                self._export_fp32(fp32)
            if self.quantize and not self.model_file.is_file():
                quantize_int8(fp32, self.model_file)
        return self.model_file

    def _export_fp32(self, out: Path) -> None:
        import torch

        st = self.torch_encoder._load()
        hf = st[0].auto_model.eval()
        if hasattr(hf, "set_attn_implementation"):  # SDPA exports as ops ORT cannot fuse
            hf.set_attn_implementation("eager")
        dummy = st.tokenizer(["an example query", "a second, longer example query"], padding=True,
                             return_tensors="pt")
        names = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in dummy]

        class Wrapped(torch.nn.Module):
            def __init__(self, m: torch.nn.Module):
                super().__init__()
                self.m = m

            def forward(self, *args: torch.Tensor) -> torch.Tensor:
                return self.m(**dict(zip(names, args, strict=True))).last_hidden_state

        raw = out.with_name("raw.onnx")
        out.parent.mkdir(parents=True, exist_ok=True)
        axes = {k: {0: "batch", 1: "seq"} for k in [*names, "token_embeddings"]}
        with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on MiniLM's masks: not ours to act on
            warnings.simplefilter("ignore")
            torch.onnx.export(Wrapped(hf), tuple(dummy[k] for k in names), str(raw), input_names=names,
                              output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17,
                              dynamo=False)
        cfg = hf.config
        if cfg.model_type in _BERT_LIKE:
            from onnxruntime.transformers import optimizer

            opt = optimizer.optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                           hidden_size=cfg.hidden_size, opt_level=1)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            opt.save_model_to_file(str(tmp))
            os.replace(tmp, out)
            raw.unlink()
        else:
            os.replace(raw, out)

    def _load(self) -> Any:
        if self._session is None:
            ort = _require_onnxruntime()
            path = self.export()
            import torch

            so = ort.SessionOptions()
            # the same thread count torch uses (OMP_NUM_THREADS), so it shares cores as the torch path does
            so.intra_op_num_threads = int(self.threads or torch.get_num_threads())
            so.inter_op_num_threads = 1
            # ORT's threads would spin between runs and hold the cores that the pooling's torch threads then
            # wait for (MiniLM int8, 1,000 LLMRouter queries, 2 cores: pooling 0.8 s -> 0.1 s, 117 -> 131 texts/s)
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            self._inputs = [i.name for i in self._session.get_inputs()]
        return self._session

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        """Unit rows in input order. The texts are tokenised once, sorted by token count and run in
        batches of at most `batch_size` rows and `max_batch_tokens` padded tokens (see length_batches)."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        import torch

        session, st = self._load(), self.torch_encoder._load()
        tok = st.tokenizer(list(texts), truncation=True, max_length=self.max_seq_length or st.max_seq_length)
        ids = tok["input_ids"]
        pad = st.tokenizer.pad_token_id or 0
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for idx in length_batches([len(x) for x in ids], batch_size, self.max_batch_tokens):
            width = len(ids[idx[0]])
            enc = {k: np.full((len(idx), width), pad if k == "input_ids" else 0, dtype=np.int64)
                   for k in ("input_ids", "attention_mask", "token_type_ids")}
            for row, i in enumerate(idx):
                n = len(ids[i])
                enc["input_ids"][row, :n] = ids[i]
                enc["attention_mask"][row, :n] = 1
                if "token_type_ids" in tok:
                    enc["token_type_ids"][row, :n] = tok["token_type_ids"][i]
            tokens = session.run(None, {k: enc[k] for k in self._inputs})[0]
            features: dict[str, Any] = {"token_embeddings": torch.from_numpy(tokens),
                                        "attention_mask": torch.from_numpy(enc["attention_mask"])}
            with torch.inference_mode():
                for module in list(st)[1:]:  # pooling (and dense / normalise) as the model defines them
                    features = module(features)
            out[idx] = features["sentence_embedding"].float().numpy()
        return l2_normalise(out)


def routing_agreement(reference: np.ndarray, candidate: np.ndarray, perf: np.ndarray, n_train: int,
                      ridge: float = 30.0, strong_share: float | None = None) -> dict[str, float]:
    """How another encoder's vectors change a router's decisions (the int8 check of issue 17).

    A ridge-regression router is fitted on the reference vectors of the first `n_train` rows (to each
    model's score, `perf` [N, M]) and picks the argmax model for the remaining rows, once from the
    reference vectors and once from the candidate's. With `strong_share` (two models, strong first) it
    routes as RouteLLM does at a call budget instead: to the strong model where the predicted score
    difference is above the threshold that sends that share of the test queries there under the
    reference vectors (the same threshold for the candidate); an argmax of two models often picks the
    strong one for every query. Returns the share of the same picks, the mean score of each encoder's
    picks and their difference, the share of reference picks of model 0, and the median reference
    margin (best minus second-best predicted score, or the distance to the threshold) of the decisions
    that changed against that of all decisions: changes among near-ties cost no quality (NaN when none
    changed)."""
    if not 0 < n_train < len(reference):
        raise ValueError(f"routing_agreement needs train and test rows: n_train={n_train} of {len(reference)}")
    x, y = reference[:n_train], np.nan_to_num(perf[:n_train], nan=0.0)
    w = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    test = np.nan_to_num(perf[n_train:], nan=0.0)
    pred, cand = reference[n_train:] @ w, candidate[n_train:] @ w
    if strong_share is not None:
        if perf.shape[1] != 2 or not 0 < strong_share < 1:
            raise ValueError(f"strong_share needs 2 models and a share in (0, 1), got {perf.shape[1]} "
                             f"models and {strong_share}")
        diff = pred[:, 0] - pred[:, 1]
        threshold = np.quantile(diff, 1 - strong_share)
        ref_pick = (diff <= threshold).astype(int)  # 0: the strong model
        cand_pick = (cand[:, 0] - cand[:, 1] <= threshold).astype(int)
        margin = np.abs(diff - threshold)
    else:
        ref_pick, cand_pick = pred.argmax(1), cand.argmax(1)
        top2 = np.sort(pred, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    changed = ref_pick != cand_pick
    rows = np.arange(len(test))
    ref_q, cand_q = float(test[rows, ref_pick].mean()), float(test[rows, cand_pick].mean())
    return {"same_pick": float(1 - changed.mean()), "reference_quality": ref_q, "candidate_quality": cand_q,
            "quality_diff": cand_q - ref_q, "distinct_picks": int(len(set(ref_pick.tolist()))),
            "first_model_share": float((ref_pick == 0).mean()),
            "changed_median_margin": float(np.median(margin[changed])) if changed.any() else float("nan"),
            "median_margin": float(np.median(margin))}
