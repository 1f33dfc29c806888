"""Run the real LLMRouter library (`llmrouter-lib` 0.4.0) routers on our data, as side-by-side baselines.

Run with the peer venv's python (llmrouter-lib pins its own torch/transformers stack, so it lives in
/work/peer_venv, not in our venv); `bench/_peers.py` calls it as a subprocess:

    /work/peer_venv/bin/python bench/llmrouter_peer.py IN.npz OUT.npz --routers knn,mlp,svm,mf,graph

IN.npz: x_train [N,D], y_train [N,M] (NaN = missing), cost_train [N,M], task_train [N], x_test [K,D],
task_test [K], model_names [M], model_desc_emb [M,D], seed. OUT.npz: choice_<r> [K] (model column),
train_s_<r>, infer_s_<r> (seconds), and `errors` (JSON: router -> one-line reason).

How our data goes in, so the library's own constructors, trainers, losses and route_single run:
  * Each router is built from a YAML written here, pointing `data_path.routing_data_train` at a jsonl of
    (query id, model_name, performance, embedding_id) rows and `data_path.query_embedding_data` at a .pt
    tensor holding our [N+K, D] embeddings (train rows, then test rows); query texts are ids.
  * Test routing calls the library's `route_single({"query": id})`; the only thing replaced is the
    module-level `get_longformer_embedding` each router module imported (it would download Longformer),
    swapped for a lookup of the id's precomputed embedding.
  * GraphRouter reads LLM node features from the YAML's top-level `llm_data[name].embedding` (not from
    `data_path.llm_data`, which its code never reads for this), so our description embeddings go there.
  * GraphRouter min-max scales train queries at fit time, but at route time it fits a fresh scaler on
    [already-scaled train; raw test], squashing raw test features far from the train distribution
    (graphrouter/router.py, route_single/route_batch). Unless --graph-raw, we hand GraphRouter embeddings
    min-max scaled with the train statistics (test clipped to [0, 1]) so both of its scalers are the
    identity; its code is unchanged.
  * Every router labels a query by its first max-performance row (pandas idxmax / np.argmax), and 89%
    of LLMRouter train queries tie at the max, so row order decides most labels; by default each query's
    rows are written best-train-mean model first (--tie-order column: our column order, which on
    LLMRouter hands 70% of labels to column 0).
Hyperparameters are the library's defaults (DEFAULT_HPARAMS, from its shipped configs/READMEs); the
routers learn only from the `performance` column (per-query argmax / pairwise wins), so routing is
performance-first; `metric.weights` is set to performance 1, cost 0 (no router here reads cost).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm import retries a web fetch
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may pull weights from the hub

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# name -> (module, router class, trainer class, saved-model file suffix)
ROUTERS: dict[str, tuple[str, str, str, str]] = {
    "knn": ("llmrouter.models.knnrouter", "KNNRouter", "KNNRouterTrainer", ".pkl"),
    "mlp": ("llmrouter.models.mlprouter", "MLPRouter", "MLPTrainer", ".pkl"),
    "svm": ("llmrouter.models.svmrouter", "SVMRouter", "SVMRouterTrainer", ".pkl"),
    "mf": ("llmrouter.models.mfrouter", "MFRouter", "MFRouterTrainer", ".pkl"),
    "graph": ("llmrouter.models.graphrouter", "GraphRouter", "GraphTrainer", ".pt"),
}

# The library's defaults: configs/model_config_train/{mlp,svm,mf}router.yaml; knnrouter and graphrouter
# READMEs' training YAML (graph's equal its code fallbacks). MF's text_dim (768 = Longformer) is set to D.
DEFAULT_HPARAMS: dict[str, dict[str, Any]] = {
    "knn": {"n_neighbors": 5, "weights": "uniform", "algorithm": "auto", "leaf_size": 30, "p": 2,
            "metric": "minkowski", "n_jobs": -1},
    "mlp": {"hidden_layer_sizes": [128, 64], "activation": "relu", "lr": 0.001, "epochs": 100,
            "batch_size": 32, "alpha": 0.0001},
    "svm": {"kernel": "rbf", "C": 1.0, "gamma": "scale", "probability": True},
    "mf": {"latent_dim": 128, "text_dim": 768, "lr": 0.001, "epochs": 5, "noise_alpha": 0.0},
    "graph": {"hidden_dim": 64, "learning_rate": 0.001, "weight_decay": 0.0001, "train_epoch": 100,
              "batch_size": 4, "train_mask_rate": 0.3, "val_split_ratio": 0.2},
}


def effective_hparams(name: str, d: int) -> dict[str, Any]:
    """The defaults, except MF's text_dim, which must be our embedding width D."""
    return {**DEFAULT_HPARAMS[name], **({"text_dim": d} if name == "mf" else {})}


def _seed_all(seed: int) -> None:
    """The library seeds nothing itself (shuffles, inits, graph val split), so seed every RNG it uses."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _minmax_for_graph(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Train-statistics min-max scaling (test clipped) that makes GraphRouter's own two scalers identities."""
    lo, hi = x_train.min(0), x_train.max(0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return (x_train - lo) / span, np.clip((x_test - lo) / span, 0.0, 1.0)


def _write_inputs(work: Path, x_all: np.ndarray, y: np.ndarray, cost: np.ndarray, task: np.ndarray,
                  names: list[str], tag: str, tie_order: str) -> tuple[Path, Path]:
    """The library's standard routing format: one jsonl row per observed (query, model) pair + a .pt table.

    Every router here labels a query by its first max-performance row, so the row order within a query
    breaks ties (89% of LLMRouter train queries tie at the max): "train-mean" writes models best train
    mean first, "column" in our column order."""
    emb_path, rows_path = work / f"emb_{tag}.pt", work / f"routing_{tag}.jsonl"
    torch.save(torch.from_numpy(np.ascontiguousarray(x_all, dtype=np.float32)), emb_path)
    order = np.arange(len(names))
    if tie_order == "train-mean":
        order = np.argsort(-np.nan_to_num(np.nanmean(y, 0), nan=-np.inf), kind="stable")
    with rows_path.open("w", encoding="utf-8") as f:
        for i in range(y.shape[0]):
            for m in order:
                name = names[m]
                if np.isfinite(y[i, m]):
                    f.write(json.dumps({"query": f"train-{i}", "model_name": name,
                                        "performance": float(y[i, m]), "cost": float(cost[i, m]),
                                        "task_name": str(int(task[i])), "embedding_id": i}) + "\n")
    return emb_path, rows_path


def _write_yaml(work: Path, name: str, d: int, emb_path: Path, rows_path: Path, names: list[str],
                desc: np.ndarray) -> Path:
    """A training+inference YAML in the library's own schema, with absolute paths into `work`."""
    hparam = effective_hparams(name, d)
    model_file = str(work / f"{name}{ROUTERS[name][3]}")
    cfg: dict[str, Any] = {
        "data_path": {"routing_data_train": str(rows_path), "query_embedding_data": str(emb_path)},
        "model_path": {"ini_model_path": "", "save_model_path": model_file, "load_model_path": model_file},
        "metric": {"weights": {"performance": 1, "cost": 0, "llm_judge": 0}},
        "hparam": hparam,
    }
    if name == "graph":
        cfg["llm_data"] = {n: {"embedding": desc[m].astype(float).tolist()} for m, n in enumerate(names)}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def _run_one(name: str, work: Path, x_train: np.ndarray, x_test: np.ndarray, inp: dict[str, np.ndarray],
             names: list[str], seed: int, graph_raw: bool, tie_order: str) -> tuple[np.ndarray, float, float]:
    """Build the router from YAML, train with the library's trainer, route each test id with route_single."""
    if name == "graph" and not graph_raw:
        x_train, x_test = _minmax_for_graph(x_train, x_test)
    x_all = np.concatenate([x_train, x_test]).astype(np.float32)
    emb_path, rows_path = _write_inputs(work, x_all, inp["y_train"], inp["cost_train"], inp["task_train"],
                                        names, name, tie_order)
    yaml_path = _write_yaml(work, name, x_all.shape[1], emb_path, rows_path, names, inp["model_desc_emb"])
    n_train = x_train.shape[0]
    table = torch.from_numpy(x_all)

    def lookup(text: str | list[str]) -> torch.Tensor:
        """Stands in for get_longformer_embedding: the query 'train-i' / 'test-k' -> our embedding row."""
        if not isinstance(text, str):
            return torch.stack([lookup(t) for t in text])
        split, idx = text.split("-")
        return table[int(idx) + (n_train if split == "test" else 0)].clone()

    module_name, router_cls, trainer_cls, _ = ROUTERS[name]
    package = importlib.import_module(module_name)
    for sub in ("router", "trainer"):  # every module of this router that imported the encoder by name
        mod = importlib.import_module(f"{module_name}.{sub}")
        if hasattr(mod, "get_longformer_embedding"):
            mod.get_longformer_embedding = lookup
    _seed_all(seed)
    t0 = time.perf_counter()
    router = getattr(package, router_cls)(yaml_path=str(yaml_path))
    getattr(package, trainer_cls)(router=router, device="cpu").train()
    train_s = time.perf_counter() - t0
    col = {n: m for m, n in enumerate(names)}
    t0 = time.perf_counter()
    choice = np.array([col[router.route_single({"query": f"test-{k}"})["model_name"]]
                       for k in range(x_test.shape[0])], dtype=np.int64)
    return choice, train_s, time.perf_counter() - t0


def _reason(exc: BaseException) -> str:
    """One line: exception, message, and the innermost library frame (file:line) that raised it."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "llmrouter" in f.filename]
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{where}: {msg}"


def main(argv: list[str] | None = None) -> int:
    """Parse args, run each requested router (isolating failures), write the output npz."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inp", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--routers", default="knn,mlp,svm,mf,graph")
    ap.add_argument("--graph-raw", action="store_true",
                    help="feed GraphRouter raw embeddings (keeps its train/test scaler mismatch)")
    ap.add_argument("--tie-order", choices=("train-mean", "column"), default="train-mean",
                    help="row order within a query, which decides the library's argmax ties")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 suits these small models and a shared CPU (oversubscription stalls)")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    with np.load(args.inp, allow_pickle=False) as z:
        inp = {k: z[k] for k in z.files}
    names = [str(n) for n in inp["model_names"]]
    seed = int(inp["seed"])
    x_train = inp["x_train"].astype(np.float32)
    x_test = inp["x_test"].astype(np.float32)
    out: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    for name in [r.strip() for r in args.routers.split(",") if r.strip()]:
        if name not in ROUTERS:
            errors[name] = f"unknown router (known: {','.join(ROUTERS)})"
            continue
        print(f"[llmrouter_peer] {name} ...", file=sys.stderr, flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix=f"llmrouter_{name}_") as tmp, \
                    contextlib.redirect_stdout(sys.stderr):  # library prints go to the log, not stdout
                choice, train_s, infer_s = _run_one(name, Path(tmp), x_train, x_test, inp, names, seed,
                                                    args.graph_raw, args.tie_order)
        except Exception as exc:  # one router failing must not lose the others
            traceback.print_exc(file=sys.stderr)
            errors[name] = _reason(exc)
            continue
        out[f"choice_{name}"], out[f"train_s_{name}"], out[f"infer_s_{name}"] = choice, train_s, infer_s
        print(f"[llmrouter_peer] {name}: train {train_s:.1f}s, route {infer_s:.1f}s", file=sys.stderr)
    out["errors"] = np.array(json.dumps(errors))
    out["tie_order"] = np.array(args.tie_order)
    out["hparams"] = np.array(json.dumps({n: effective_hparams(n, x_train.shape[1]) for n in ROUTERS}))
    np.savez(args.out, **out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
