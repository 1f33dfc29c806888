"""Peer-library baselines for the routing benchmark, run out of process in their own virtualenv.

The real LLMRouter library (`llmrouter-lib`, import `llmrouter`) pins a different torch/transformers
stack than ours, so it cannot share our venv: `llmrouter_peer_choices` writes one .npz, runs
`bench/llmrouter_peer.py` under the peer venv's python, and reads the routing decisions back. Nothing
here imports the peer library, so our venv needs no extra packages.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PEER_SCRIPT = Path(__file__).resolve().parent / "llmrouter_peer.py"
PEER_PYTHON = "/work/peer_venv/bin/python"
PEER_ROUTERS = ("knn", "mlp", "svm", "mf", "graph")
# torch first, pinned: an unpinned resolve of llmrouter-lib's `torch>=2.0` pulls a multi-GB CUDA build.
PEER_VENV_HELP = (
    "python3 -m venv /work/peer_venv && /work/peer_venv/bin/pip install torch==2.13.0 && "
    "/work/peer_venv/bin/pip install llmrouter-lib==0.4.0 torch==2.13.0"
)


def llmrouter_peer_choices(
    x_train: np.ndarray,
    y_train: np.ndarray,
    cost_train: np.ndarray,
    task_train: np.ndarray,
    x_test: np.ndarray,
    task_test: np.ndarray,
    model_names: Sequence[str],
    model_desc_emb: np.ndarray,
    seed: int,
    routers: Sequence[str] = PEER_ROUTERS,
    python: str = PEER_PYTHON,
    timeout_s: float = 1800,
) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, str]]:
    """LLMRouter's kNN/MLP/SVM/MF/graph routers trained on our train split, routing our test queries.

    Args are our arrays (y_train NaN where a pair is missing, cost in USD); embeddings are used as
    given, in place of the library's Longformer encoder. Returns (choices: router -> [K] model column,
    train seconds: router -> s, errors: router -> one-line reason). Never raises for a missing peer
    venv, a crash or a timeout: those come back as errors, so a benchmark can still print its table.
    """
    routers = tuple(routers)
    if not Path(python).exists():
        why = f"peer python {python} not found; create the venv with: {PEER_VENV_HELP}"
        return {}, {}, dict.fromkeys(routers, why)
    y = np.asarray(y_train, dtype=np.float32)
    arrays = {
        "x_train": np.asarray(x_train, dtype=np.float32),
        "y_train": y,
        "cost_train": np.nan_to_num(np.asarray(cost_train, dtype=np.float32).reshape(y.shape)),
        "task_train": np.asarray(task_train, dtype=np.int64),
        "x_test": np.asarray(x_test, dtype=np.float32),
        "task_test": np.asarray(task_test, dtype=np.int64),
        "model_names": np.asarray([str(n) for n in model_names]),
        "model_desc_emb": np.asarray(model_desc_emb, dtype=np.float32),
        "seed": np.asarray(int(seed)),
    }
    with tempfile.TemporaryDirectory(prefix="peers_") as tmp:
        inp, out, log = Path(tmp) / "in.npz", Path(tmp) / "out.npz", Path(tmp) / "peer.log"
        np.savez(inp, **arrays)
        cmd = [python, str(PEER_SCRIPT), str(inp), str(out), "--routers", ",".join(routers)]
        try:
            with log.open("w") as f:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return {}, {}, dict.fromkeys(routers, f"peer run timed out after {timeout_s:.0f}s")
        if proc.returncode != 0 or not out.exists():
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            return {}, {}, dict.fromkeys(routers, f"peer script exited {proc.returncode}: {tail}")
        with np.load(out, allow_pickle=False) as z:
            choices = {r: z[f"choice_{r}"].astype(np.int64) for r in routers if f"choice_{r}" in z.files}
            train_s = {r: float(z[f"train_s_{r}"]) for r in routers if f"train_s_{r}" in z.files}
            errors = json.loads(str(z["errors"]))
    for r in routers:
        if r not in choices and r not in errors:
            errors[r] = "peer script returned no decisions"
    return choices, train_s, errors
