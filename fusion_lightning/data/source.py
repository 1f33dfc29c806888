"""The `data` config: one schema for every log source (recipes' `data` group, `load_from_config`, readers).

Registered with Hydra's ConfigStore as `data/base`, which every `recipes/data/*.yaml` extends, so a
wrong type (`data.val_fraction=abc`) or an unknown key is a one-line error before anything runs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from fusion_lightning.data.readers import ReaderOptions


@dataclass
class SyntheticSource:
    """Only for format=synthetic: the seeded LLMFusionBench-shaped generator's size."""

    n_queries: int = 3000
    models: int = 20
    seed: int = 0


@dataclass
class BanditSimulation:
    """`data.bandit`: make a full-information log a simulated bandit log, one call per query drawn by a
    named logging policy (fusion_lightning.data.bandit), keeping the full log as the truth to check
    off-policy estimates against."""

    logger: str = "none"  # none | uniform | router
    checkpoint: Optional[str] = None  # logger=router: the router checkpoint whose choices are logged  # noqa: UP045
    epsilon: float = 0.0  # share of uniform exploration mixed into the logger
    temperature: Optional[float] = None  # logger=router: softmax of its scores at this temperature, else greedy  # noqa: UP045
    seed: int = 0


@dataclass
class DataSource:
    format: str = "synthetic"  # llmfusionbench | llmrouter | llmrouter_long | routerbench | routellm | preferences | synthetic
    path: Optional[str] = None  # one file or a directory of files of that format  # noqa: UP045 (OmegaConf)
    catalog: Optional[str] = None  # model catalog JSON (sizes, prices, descriptions)  # noqa: UP045
    queries: Optional[str] = None  # query file(s) joined on the query text (LLMRouter)  # noqa: UP045
    task: Optional[str] = None  # force one task name for files that carry none  # noqa: UP045
    on_error: str = "raise"  # raise | quarantine (bad rows go to quarantine.jsonl in the run dir)
    duplicates: str = "error"  # a (query, model) pair logged twice differently: error | mean | first | last
    split: str = "auto"  # auto (file names, else by query) | files | query
    split_seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    responses: bool = True  # false: response texts are not read (null); routers set it
    rescore: bool = False  # true: performance := the scorer's score of response vs ground_truth/metric
    synthetic: SyntheticSource = field(default_factory=SyntheticSource)
    log_kind: str = "auto"  # auto | full | bandit (a subset of models per query: off-policy estimates)
    propensity: str = "logged"  # logged | estimate (a cross-fitted classifier of the logged choice)
    bandit: BanditSimulation = field(default_factory=BanditSimulation)

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> DataSource:
        """A plain `data` mapping (resolved) -> DataSource; unknown keys are a ValueError naming the valid ones."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown data key(s) {unknown}; valid: {', '.join(names)}")
        d = dict(data)
        d["synthetic"] = SyntheticSource(**(d.get("synthetic") or {}))
        d["bandit"] = BanditSimulation(**(d.get("bandit") or {}))
        return cls(**d)

    def reader_options(self) -> ReaderOptions:
        # re-scoring reads the responses whatever `responses` says
        return ReaderOptions(catalog=self.catalog, queries=self.queries, task=self.task,
                             responses=bool(self.responses or self.rescore))


SOURCE_DEFAULTS: dict[str, Any] = asdict(DataSource())  # the defaults as a plain dict

ConfigStore.instance().store(group="data", name="base", node=DataSource)
