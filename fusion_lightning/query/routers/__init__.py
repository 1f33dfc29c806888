"""The routers, one file each: a `RouterModule` subclass per file, plus its model YAML in `recipes/model/`.

What a router file holds is the class that maps (query features, task) to per-model predicted score
and cost; what every router shares (evaluation, the task prior, the route API, metrics, the
DataModules) stays one level up in `fusion_lightning.query`. Adding a router: docs/adding.md.

Checkpoints name their class by import path (`router_class`, and router_auto's candidates by
`_target_`). Those written before the routers moved here say `fusion_lightning.query.mlp.MLPRouter`;
`current_path` maps such a path to where the class lives now, so old checkpoints keep loading.
"""

from __future__ import annotations

# module paths before the routers moved into this package -> where they are now
MOVED = {f"fusion_lightning.query.{old}": f"fusion_lightning.query.routers.{new}" for old, new in (
    ("mlp", "mlp"), ("knn", "knn"), ("mf", "mf"), ("irt", "irt"), ("graph", "graph"), ("residual", "residual"),
    ("bt", "bt"), ("dc", "dc"), ("cascade", "cascade"), ("auto", "auto"), ("encoder", "finetuned_encoder"))}


def current_path(dotted: str) -> str:
    """'fusion_lightning.query.mlp.MLPRouter' -> 'fusion_lightning.query.routers.mlp.MLPRouter'; other paths
    unchanged."""
    module, _, name = dotted.rpartition(".")
    return f"{MOVED.get(module, module)}.{name}" if module else dotted
