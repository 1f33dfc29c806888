"""Open Bandit Pipeline's estimators on bench/bandit.py's bandit draws: run under OBP's own venv.

OBP (`obp` on PyPI, unmaintained since 2023) pins old numpy / scikit-learn / pandas and Python < 3.11, so it
never enters our venv: bench/bandit.py writes one .npz of draws (the logged action, its reward and
propensity, the cross-fitted reward model's predictions for every action) and targets (the target
policy's action distribution), runs this script under `bench/out/obp_venv/bin/python` and reads one JSON
back. Nothing here imports fusion_lightning.

    python bench/_obp_check.py IN.npz OUT.json

Per case (a draw × a target): OBP's ReplayMethod (the naive mean of the rounds where the target agrees
with the logger), DirectMethod, InverseProbabilityWeighting, SelfNormalizedInverseProbabilityWeighting,
DoublyRobust, each at its defaults (no weight clipping: lambda_ = inf), plus DR's bootstrap interval.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(argv: list[str]) -> int:
    import obp
    from obp.ope import (
        DirectMethod,
        DoublyRobust,
        InverseProbabilityWeighting,
        ReplayMethod,
        SelfNormalizedInverseProbabilityWeighting,
    )

    src, dst = argv[0], argv[1]
    z = np.load(src, allow_pickle=False)
    cases = json.loads(str(z["cases"]))
    out = {"obp_version": obp.__version__, "numpy_version": np.__version__, "cases": {}}
    for case in cases:
        d, t = case["draw"], case["target"]
        action = z[f"action_{d}"].astype(int)
        reward = z[f"reward_{d}"].astype(float)
        pscore = z[f"pscore_{d}"].astype(float)
        q_hat = z[f"qhat_{d}"].astype(float)[:, :, None]  # [n, actions, len_list=1]
        dist = z[f"pi_{t}"].astype(float)[:, :, None]
        common = {"reward": reward, "action": action, "action_dist": dist}
        values = {
            "naive": ReplayMethod().estimate_policy_value(**common),
            "dm": DirectMethod().estimate_policy_value(action_dist=dist, estimated_rewards_by_reg_model=q_hat),
            "ips": InverseProbabilityWeighting().estimate_policy_value(**common, pscore=pscore),
            "snips": SelfNormalizedInverseProbabilityWeighting().estimate_policy_value(**common, pscore=pscore),
            "dr": DoublyRobust().estimate_policy_value(**common, pscore=pscore, estimated_rewards_by_reg_model=q_hat),
        }
        ci = DoublyRobust().estimate_interval(**common, pscore=pscore, estimated_rewards_by_reg_model=q_hat,
                                              n_bootstrap_samples=1000, random_state=0)
        lo, hi = (float(v) for k, v in ci.items() if "CI" in k)
        out["cases"][case["id"]] = {**{k: float(v) for k, v in values.items()}, "dr_lo": lo, "dr_hi": hi}
    with open(dst, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
