"""The graph router's heterogeneous graph: task, query and LLM nodes over the training context.

The context (training queries with their observed scores) is kept dense — [N, M] normalised
performance, cost and mask — so adding an LLM is adding a column. Edges are materialised per step,
which is where a training batch's own query–LLM edges are left out (the model must not read the
answers it is scored on) and where new queries are attached inductively: to their task node and
their nearest context queries, never to an LLM.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch_geometric.data import HeteroData

QUERY, TASK, LLM = "query", "task", "llm"
NODE_TYPES = (QUERY, TASK, LLM)
TASK_TO_QUERY = (TASK, "has", QUERY)
QUERY_TO_TASK = (QUERY, "in", TASK)
LLM_TO_QUERY = (LLM, "scored", QUERY)
QUERY_TO_LLM = (QUERY, "rates", LLM)
NEAR = (QUERY, "near", QUERY)
# edge type -> edge feature size (None: no features): [perf_n, cost_n] on query–LLM edges, similarity on kNN
EDGE_DIMS: dict[tuple[str, str, str], int | None] = {
    TASK_TO_QUERY: None, QUERY_TO_TASK: None, LLM_TO_QUERY: 2, QUERY_TO_LLM: 2, NEAR: 1}
CONTEXT_KEYS = ("ctx_x", "ctx_task", "ctx_perf_n", "ctx_cost_n", "ctx_mask", "ctx_knn", "ctx_knn_sim",
                "llm_x", "task_x", "llm_new")


def knn(x: torch.Tensor, keys: torch.Tensor, k: int, exclude_offset: int | None = None,
        chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and cosine similarities [B, k] of the nearest `keys`; chunked to bound the [B, N] matrix.

    `exclude_offset`: row i of `x` is key `exclude_offset + i` (the context searching itself), skip it.
    """
    k = min(k, len(keys) - (exclude_offset is not None))
    if k <= 0 or len(x) == 0:
        empty = torch.zeros(len(x), 0, device=x.device)
        return empty.long(), empty
    keys = torch.nn.functional.normalize(keys.float(), dim=-1)
    idx, sim = [], []
    for i in range(0, len(x), chunk):
        s = torch.nn.functional.normalize(x[i:i + chunk].float(), dim=-1) @ keys.T
        if exclude_offset is not None:
            rows = torch.arange(len(s), device=s.device)
            s[rows, exclude_offset + i + rows] = float("-inf")
        top, j = s.topk(k, dim=1)
        idx.append(j)
        sim.append(top)
    return torch.cat(idx), torch.cat(sim)


def build_graph(ctx: Mapping[str, torch.Tensor], new_x: torch.Tensor | None = None,
                new_task: torch.Tensor | None = None, drop: torch.Tensor | None = None, k: int = 8,
                keep: torch.Tensor | None = None) -> HeteroData:
    """The message-passing graph: context query nodes 0..N-1, then the new queries N..N+B-1.

    drop: context rows whose query–LLM edges are left out (the training batch being scored).
    keep: [N, M] bool, which other context query–LLM edges to use (edge dropout in training).
    Task 0 is the unknown task: such queries get no task edge. Edges only flow *into* new queries,
    so their predictions do not depend on what else is in the batch.
    """
    x, task, mask = ctx["ctx_x"], ctx["ctx_task"], ctx["ctx_mask"].clone()
    dev, n = x.device, len(x)
    if drop is not None:
        mask[drop] = False
    if keep is not None:
        mask &= keep
    q, m = mask.nonzero(as_tuple=True)
    qlm_attr = torch.stack([ctx["ctx_perf_n"][q, m], ctx["ctx_cost_n"][q, m]], dim=1)

    rows = torch.arange(n, device=dev)
    near_src, near_dst = ctx["ctx_knn"].reshape(-1), rows.repeat_interleave(ctx["ctx_knn"].shape[1])
    near_sim = ctx["ctx_knn_sim"].reshape(-1)
    q_x, q_task = x, task
    if new_x is not None:
        assert new_task is not None, "new queries need task ids (0 = unknown)"
        j, s = knn(new_x, x, k)
        new_rows = n + torch.arange(len(new_x), device=dev)
        near_src = torch.cat([near_src, j.reshape(-1)])
        near_dst = torch.cat([near_dst, new_rows.repeat_interleave(j.shape[1])])
        near_sim = torch.cat([near_sim, s.reshape(-1)])
        q_x, q_task = torch.cat([x, new_x.to(x.dtype)]), torch.cat([task, new_task.to(task.dtype)])
    known = (q_task > 0).nonzero(as_tuple=True)[0]

    g = HeteroData()
    g[QUERY].x, g[TASK].x, g[LLM].x = q_x, ctx["task_x"], ctx["llm_x"]
    g[TASK_TO_QUERY].edge_index = torch.stack([q_task[known], known])
    ctx_known = known[known < n]  # new queries send nothing, so the context is the same for every batch
    g[QUERY_TO_TASK].edge_index = torch.stack([ctx_known, q_task[ctx_known]])
    g[LLM_TO_QUERY].edge_index, g[LLM_TO_QUERY].edge_attr = torch.stack([m, q]), qlm_attr
    g[QUERY_TO_LLM].edge_index, g[QUERY_TO_LLM].edge_attr = torch.stack([q, m]), qlm_attr
    g[NEAR].edge_index, g[NEAR].edge_attr = torch.stack([near_src, near_dst]), near_sim[:, None]
    return g
