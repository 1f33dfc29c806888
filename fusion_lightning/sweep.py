"""What a Hydra multirun (`python -m fusion_lightning.fit -m recipe=... seed=1,2`) leaves in its sweep dir.

Hydra's launcher runs one job per combination, each in its own run dir (`<sweep dir>/<job number>`).
`SweepSummary` (a Hydra callback, configured in recipes/fit.yaml) records each job's overrides and
outcome and, when the sweep ends, writes `sweep.json` and the side-by-side table of
`python -m fusion_lightning.compare --root <sweep dir>` (comparison.md/.csv/.png) into the sweep dir.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fusion_lightning.compare import compare, find_runs, load_run


class SweepSummary(Callback):
    def __init__(self) -> None:
        self.jobs: list[dict[str, Any]] = []

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hc = job_return.hydra_cfg.hydra if job_return.hydra_cfg is not None else None
        self.jobs.append({
            "overrides": list(job_return.overrides or []),
            "run_dir": str(hc.runtime.output_dir) if hc is not None else None,
            "status": "completed" if job_return.status == JobStatus.COMPLETED else "failed",
        })

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if not sweep_dir.is_dir():
            return
        runs, _ = find_runs(sweep_dir)
        record = {"sweep_dir": str(sweep_dir), "jobs": self.jobs, "finished_runs": [str(r) for r in runs]}
        if runs:
            paths = compare([load_run(r) for r in runs], None, sweep_dir / "comparison")
            record["comparison"] = {k: str(v) for k, v in paths.items()}
        (sweep_dir / "sweep.json").write_text(json.dumps(record, indent=2))
