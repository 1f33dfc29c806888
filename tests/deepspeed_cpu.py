"""Test-only: Lightning's stock DeepSpeedStrategy refuses CPU, DeepSpeed's CPU accelerator works.

Run as a script (one fresh process per ZeRO stage, since DeepSpeed keeps global state):
    python tests/deepspeed_cpu.py STAGE RUN_DIR
It trains the distill_top_k recipe's student for a few steps under ZeRO-STAGE on CPU and prints JSON.
    python tests/deepspeed_cpu.py fit STAGE RUN_DIR
runs the fit command's whole path instead (fit, validate and test on the best checkpoint, the student
evaluation), once without DeepSpeed and once under ZeRO-STAGE, and prints both runs' metrics as JSON.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy  # noqa: E402

from fusion_lightning.config import compose_recipe  # noqa: E402


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """The stock strategy minus its CUDA-only checks (device check, device-index validation). Also usable
    from the fit command: `strategy._target_=deepspeed_cpu.CPUDeepSpeedStrategy` with tests/ on PYTHONPATH."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)  # DeepSpeed reads the rank from the device index

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def main(stage: int, run_dir: str) -> None:
    preset = {2: "deepspeed_zero2", 3: "deepspeed_zero3"}[stage]
    cfg = compose_recipe("distill_top_k", [f"strategy={preset}", "model=student_full", "model.lr=1e-3",
                                           "data.synthetic.n_queries=60", "data.synthetic.models=3",
                                           "datamodule.max_length=64", "datamodule.batch_size=4"])
    dm = instantiate(cfg.datamodule, _convert_="all")
    dm.setup("fit")
    model = instantiate(cfg.model, **dm.model_kwargs(), _convert_="all")
    # the preset's own values, on CPU with gloo instead of NCCL
    options = {k: v for k, v in cfg.strategy.items() if k != "_target_"}
    options.update(process_group_backend="gloo", parallel_devices=[torch.device("cpu", 0)])
    strategy = CPUDeepSpeedStrategy(**options)
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=6, limit_val_batches=2,
                        use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        num_sanity_val_steps=0, default_root_dir=run_dir, enable_checkpointing=False)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Record())
    trainer.fit(model, datamodule=dm)
    print(json.dumps({"stage": strategy.config["zero_optimization"]["stage"], "steps": trainer.global_step,
                      "losses": losses}))


FIT_OVERRIDES = ["trainer=cpu", "logger=none", "model=student_full", "model.lr=1e-3", "model.warmup_ratio=0",
                 "data.synthetic.n_queries=60", "data.synthetic.models=3", "datamodule.max_length=64",
                 "datamodule.batch_size=4", "trainer.max_epochs=1", "+trainer.limit_train_batches=6",
                 "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
                 "callbacks.student_eval.max_queries=2", "callbacks.student_eval.max_new_tokens=8"]


def fit_main(stage: int, run_dir: str) -> None:
    from fusion_lightning.fit import fit

    plain = fit(compose_recipe("distill_top_k", [*FIT_OVERRIDES, f"run_dir={run_dir}/plain"]))
    zero = fit(compose_recipe("distill_top_k", [
        *FIT_OVERRIDES, f"strategy=deepspeed_zero{stage}", "strategy._target_=deepspeed_cpu.CPUDeepSpeedStrategy",
        "strategy.process_group_backend=gloo", f"run_dir={run_dir}/zero"]))
    print(json.dumps({"plain": plain["metrics"], "zero": zero["metrics"], "zero_artifacts": zero["artifacts"]}))


if __name__ == "__main__":
    if sys.argv[1] == "fit":
        fit_main(int(sys.argv[2]), sys.argv[3])
    else:
        main(int(sys.argv[1]), sys.argv[2])
