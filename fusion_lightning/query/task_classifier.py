"""Task inference from the query text: production traffic carries no task label.

A multinomial logistic regression over the query embeddings, fitted on the train split (full batch,
L-BFGS: deterministic and under a second for tens of thousands of queries). Routers keep its weights
in their checkpoint, so the route API infers tasks for queries that come without one, and every
router run reports itself task-blind (`<split>/task_blind/*`) with exactly that inference.

Similar tasks are confused (MMLU and ARC, GSM8K and MGSM: ~87% top-1 on the LLMRouter logs), so a
router does not bet on the top task: it averages its predictions under the `TOP_K` most probable
tasks, weighted by their renormalised probabilities (5-fold CV on LLMRouter, the per-task lookup:
top-1 0.651, top-3 mixture 0.659, task known 0.665 mean performance).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOP_K = 3  # tasks a task-blind prediction averages over


def fit_task_classifier(x: torch.Tensor, task: torch.Tensor, n_tasks: int, l2: float = 1e-4,
                        max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n_tasks, D], bias [n_tasks]) predicting task indices from features `x`.

    Index 0 is the routers' unknown task: it is never a label, and its bias is -1e4 so it is never
    predicted. With one known task the classifier predicts it everywhere.
    """
    x = x.float()
    w = torch.zeros(n_tasks, x.shape[1], requires_grad=True)
    b = torch.zeros(n_tasks, requires_grad=True)
    present = torch.zeros(n_tasks, dtype=torch.bool)
    present[task.unique()] = True
    present[0] = False
    never = torch.where(present, 0.0, -1e4)  # tasks absent from train are never predicted
    if int(present.sum()) > 1:
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b + never, task) + l2 * (w ** 2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
    return w.detach(), (b.detach() + never)


def task_posterior(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, k] most probable task indices, best first; [N, k] their probabilities renormalised to sum 1)."""
    k = min(k, len(bias))
    p = torch.softmax(x.float() @ weight.T + bias, dim=-1)
    top, idx = p.topk(k, dim=-1)
    return idx, top / top.sum(-1, keepdim=True).clamp_min(1e-12)


def infer_tasks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """[N] the most probable task index per row of features `x`."""
    return (x.float() @ weight.T + bias).argmax(-1)
