"""router_auto: candidates trained side by side, one selected by val reward, only it tested."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from planted import planted_overrides, write_subtopic_logs

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.query.datamodule import RouterDataModule
from fusion_lightning.query.router import Router
from fusion_lightning.query.routers.auto import AutoRouter

# three candidates: the lookup, a residual router that can learn, an MLP that cannot (its lr is 0)
SMALL_SET = [
    "~model.candidates", "~model.ensembles",
    "+model.candidates.lookup._target_=fusion_lightning.query.routers.residual.ResidualRouter",
    "+model.candidates.lookup.alphas=[0.0]", "+model.candidates.lookup.hidden_dims=[]",
    "+model.candidates.residual._target_=fusion_lightning.query.routers.residual.ResidualRouter",
    "+model.candidates.frozen_mlp._target_=fusion_lightning.query.routers.mlp.MLPRouter",
    "+model.candidates.frozen_mlp.lr=0.0",
]


def _subtopic(tmp_path: Path, *extra: str) -> list[str]:
    folder = write_subtopic_logs(tmp_path / "sub")
    return ["data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
            f"datamodule.embedding_cache={tmp_path / 'cache'}", f"run_dir={tmp_path / 'run'}", "logger=none",
            "~callbacks.progress_bar", *extra]


def test_selects_the_candidate_that_learns_the_planted_rule(tmp_path: Path) -> None:
    summary = fit(compose_recipe("router_auto", _subtopic(tmp_path, *SMALL_SET, "trainer.max_epochs=20")))
    m, run = summary["metrics"], tmp_path / "run"
    assert summary["selection"]["winner"] == "residual", summary["selection"]
    assert set(summary["selection"]["val_reward"]) == {"lookup", "residual", "frozen_mlp"}
    assert m["test/perf"] >= m["test/task_best/perf"] + 0.2, m
    rows = {r["candidate"]: r for r in csv.DictReader((run / "selection.csv").open())}
    assert rows["residual"]["selected"] == "True" and float(rows["residual"]["train_s"]) > 0
    assert float(rows["residual"]["val_reward"]) > float(rows["lookup"]["val_reward"]) + 0.2
    assert "**residual**" in (run / "selection.md").read_text()
    assert summary["artifacts"]["selection_md"] == "selection.md"
    # the checkpoint alone routes with the winner
    router = Router.load(run / summary["artifacts"]["best_checkpoint"])
    assert isinstance(router.module, AutoRouter) and router.module.choices[int(router.module.winner)] == "residual"


def test_keeps_the_lookup_when_no_candidate_clearly_beats_it(tmp_path: Path) -> None:
    """The planted log's scores depend on the task alone: nothing beats the per-task lookup on val."""
    summary = fit(compose_recipe("router_auto", planted_overrides(tmp_path, *SMALL_SET, "trainer.max_epochs=6",
                                                                  "logger=none")))
    assert summary["selection"]["winner"] == "lookup", summary["selection"]
    m = summary["metrics"]
    assert m["test/perf"] == m["test/task_best/perf"]


def test_the_test_split_is_read_only_after_the_selection_is_final(tmp_path: Path, monkeypatch) -> None:
    events: list[str] = []

    class Guarded:
        def __init__(self, inner):
            self.inner, self.n = inner, inner.n

        def __len__(self) -> int:
            return self.n

        @property
        def tensors(self):
            events.append("test")
            return self.inner.tensors

        def __getitem__(self, i):
            events.append("test")
            return self.inner[i]

    setup, select = RouterDataModule.setup, AutoRouter._select

    def guarded_setup(self, stage=None):
        setup(self, stage)
        if not isinstance(self.splits["test"], Guarded):
            self.splits["test"] = Guarded(self.splits["test"])

    def recorded_select(self, arrays):
        events.append("select")
        return select(self, arrays)

    monkeypatch.setattr(RouterDataModule, "setup", guarded_setup)
    monkeypatch.setattr(AutoRouter, "_select", recorded_select)
    fit(compose_recipe("router_auto", _subtopic(tmp_path, *SMALL_SET, "trainer.max_epochs=4")))
    assert "select" in events and "test" in events
    first_test = events.index("test")
    assert "select" not in events[first_test:], "a selection ran after the test split was read"


def test_default_candidate_set_runs_and_documents_every_candidate(tmp_path: Path) -> None:
    summary = fit(compose_recipe("router_auto", _subtopic(tmp_path, "trainer.max_epochs=3")))
    cfg = compose_recipe("router_auto")
    # the `off_policy: direct` candidates learn differently only on a bandit log (tests/test_bandit.py)
    names = {*(n for n, spec in cfg.model.candidates.items() if spec.get("off_policy") != "direct"),
             *cfg.model.ensembles}
    assert set(summary["selection"]["val_reward"]) == names
    table = (tmp_path / "run" / "selection.md").read_text()
    for name in names:
        assert f"| {name} |" in table or f"| **{name}** |" in table
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["selection"] == summary["selection"]


def test_bad_candidate_sets_are_one_line_errors() -> None:
    kw = {"embed_dim": 4, "models": ["a", "b"], "tasks": ["<unk>", "t"], "binary": True, "encoder": "hashing",
          "normaliser": {}, "model_sizes": [None, None]}
    mlp = {"_target_": "fusion_lightning.query.routers.mlp.MLPRouter"}
    with pytest.raises(ValueError, match="reference='lookup' is not a candidate"):
        AutoRouter(**kw, candidates={"mlp": mlp})
    with pytest.raises(ValueError, match="ensemble 'e'.*members are candidate names or kinds"):
        AutoRouter(**kw, candidates={"lookup": mlp}, ensembles={"e": ["nope"]})


def test_an_ensemble_winner_predicts_the_mean_of_its_members_and_survives_a_checkpoint(tmp_path: Path) -> None:
    import torch

    kw = {"embed_dim": 2, "models": ["a", "b"], "tasks": ["<unk>", "t"], "binary": True, "encoder": "hashing",
          "normaliser": {}, "model_sizes": [None, None]}
    lookup = {"_target_": "fusion_lightning.query.routers.residual.ResidualRouter", "alphas": [0.0], "hidden_dims": []}
    r = AutoRouter(**kw, candidates={"lookup": lookup, "other": lookup}, ensembles={"both": ["lookup", "other"]})
    for name, prior in (("lookup", [[0.2, 0.6], [0.2, 0.6]]), ("other", [[0.8, 0.0], [0.8, 0.0]])):
        r.candidates[name].prior_perf = torch.tensor(prior)
        r.candidates[name].prior_cost = torch.zeros(2, 2)
    r.winner.fill_(r.choices.index("both"))
    r.members[0] = torch.tensor([True, True])
    perf, _ = r.predict(torch.zeros(1, 2), torch.tensor([1]))
    torch.testing.assert_close(perf, torch.tensor([[0.5, 0.3]]))
    torch.save({"state_dict": r.state_dict()}, tmp_path / "s.pt")
    again = AutoRouter(**kw, candidates={"lookup": lookup, "other": lookup}, ensembles={"both": ["lookup", "other"]})
    again.load_state_dict(torch.load(tmp_path / "s.pt")["state_dict"])
    torch.testing.assert_close(again.predict(torch.zeros(1, 2), torch.tensor([1]))[0], perf)


def test_resume_from_last_gives_the_uninterrupted_selection(tmp_path: Path) -> None:
    """Holdout selection: ckpt_path=last continues every candidate from its live weights (the checkpoint's state_dict holds the
    best ones, for routing), with the same bookkeeping: the same selection and test metrics."""
    full = fit(compose_recipe("router_auto", _subtopic(tmp_path / "a", *SMALL_SET, "trainer.max_epochs=4",
                                                       "model.selection=holdout")))
    part = _subtopic(tmp_path / "b", *SMALL_SET, "model.selection=holdout")
    fit(compose_recipe("router_auto", [*part, "trainer.max_epochs=2"]))
    resumed = fit(compose_recipe("router_auto", [*part, "trainer.max_epochs=4", "ckpt_path=last"]))
    assert resumed["selection"] == full["selection"]
    assert resumed["metrics"]["test/perf"] == full["metrics"]["test/perf"]


def test_bonferroni_threshold_grows_with_the_number_of_choices() -> None:
    from fusion_lightning.query.auto_selection import selection_z

    assert selection_z(1.5, 13) == 1.5
    assert selection_z("bonferroni", 2) == pytest.approx(1.645, abs=1e-3)  # one comparison: one-sided 5%
    assert selection_z("bonferroni", 13) == pytest.approx(2.638, abs=1e-3)  # 12 comparisons with the lookup
    with pytest.raises(ValueError, match="a number or 'bonferroni'"):
        selection_z("holm", 13)


# a weaker sub-topic rule than write_subtopic_logs' default: a router reading the query gains ~0.12 a query
WEAK_SIGNAL = {"alpha": ({"arithmetic": 0.7, "geometry": 0.45, "rivers": 0.7, "capitals": 0.45}, 0.3),
               "beta": ({"arithmetic": 0.45, "geometry": 0.7, "rivers": 0.45, "capitals": 0.7}, 0.3)}


def test_cross_validation_finds_a_planted_winner_that_one_val_split_misses(tmp_path: Path) -> None:
    """40 val queries cannot tell a ~0.12 gain from noise at z = 1.96; 400 out-of-fold queries can. The
    winner is refitted on train + val and beats the lookup on the (untouched) test split."""
    folder = write_subtopic_logs(tmp_path / "weak", n_per_subtopic=100, models=WEAK_SIGNAL)
    base = ["data=llmrouter", f"data.path={folder}", "datamodule.encoder=hashing",
            f"datamodule.embedding_cache={tmp_path / 'cache'}", "logger=none", "~callbacks.progress_bar",
            *SMALL_SET, "trainer.max_epochs=15"]
    holdout = fit(compose_recipe("router_auto", [*base, f"run_dir={tmp_path / 'h'}", "model.selection=holdout"]))
    assert holdout["selection"]["winner"] == "lookup", holdout["selection"]
    cv = fit(compose_recipe("router_auto", [*base, f"run_dir={tmp_path / 'cv'}"]))
    sel = cv["selection"]
    assert (sel["winner"], sel["selection"], sel["folds"], sel["queries"]) == ("residual", "cv", 5, 400), sel
    # Platt scaling would change the decisions the paired test vouched for; and the refit trains on val too, so a
    # val-picked decision would be read off its own training data
    assert cv["score_calibration"]["skipped"].startswith("AutoRouter keeps its predictions as selected or trained")
    assert "no decision picked on val: val is in the refit's training data" in (tmp_path / "cv" / "routing_table.md").read_text()
    rows = {r["candidate"]: r for r in csv.DictReader((tmp_path / "cv" / "selection.csv").open())}
    assert float(rows["residual"]["gain_over_reference"]) > sel["se_factor"] * float(rows["residual"]["gain_se"])
    assert len(rows["residual"]["fold_gains"].split()) == 5
    assert sel["refit_epochs"]["residual"] >= 1 and (tmp_path / "cv" / "cv" / "fold4" / "selection.md").is_file()
    m = cv["metrics"]
    assert m["test/perf"] >= m["test/task_best/perf"] + 0.05, m
    assert "out-of-fold over 5-fold cross-validation" in (tmp_path / "cv" / "selection.md").read_text()
    router = Router.load(tmp_path / "cv" / cv["artifacts"]["best_checkpoint"])
    assert router.module.choices[int(router.module.winner)] == "residual"
    assert float(router.module.candidates["residual"].alpha) > 0  # the folds' α, not the refit's in-sample pick


def test_folds_are_stratified_by_task_and_never_hold_the_test_split() -> None:
    import numpy as np

    from fusion_lightning.query.auto_selection import SealedSplit, stratified_folds

    tasks = np.repeat([0, 1, 2], [50, 23, 7])
    folds = stratified_folds(tasks, 5, seed=0)
    for t, n in ((0, 50), (1, 23)):
        counts = np.bincount(folds[tasks == t], minlength=5)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
    assert np.array_equal(folds, stratified_folds(tasks, 5, seed=0))
    assert not np.array_equal(folds, stratified_folds(tasks, 5, seed=1))
    with pytest.raises(ValueError, match="at least 2"):
        stratified_folds(tasks, 1, seed=0)
    with pytest.raises(RuntimeError, match="read the test split"):
        _ = SealedSplit().tensors


def test_cv_resume_reuses_the_checkpoints_selection_without_refolding(tmp_path: Path, monkeypatch) -> None:
    from fusion_lightning.query import auto_selection

    part = _subtopic(tmp_path, *SMALL_SET)
    first = fit(compose_recipe("router_auto", [*part, "trainer.max_epochs=4"]))

    def no_folds(*a, **k):
        raise AssertionError("the folds ran again on resume")

    monkeypatch.setattr(auto_selection, "cross_validate", no_folds)
    monkeypatch.setattr("fusion_lightning.query.routers.auto.cross_validate", no_folds)
    resumed = fit(compose_recipe("router_auto", [*part, "trainer.max_epochs=4", "ckpt_path=last"]))
    assert resumed["selection"] == first["selection"]
    assert resumed["metrics"]["test/perf"] == first["metrics"]["test/perf"]
    with pytest.raises(ValueError, match="model.selection=holdout"):
        fit(compose_recipe("router_auto", [*part, "trainer.max_epochs=4", "trainer.devices=2",
                                           "strategy=ddp", f"run_dir={tmp_path / 'ddp'}"]))


def test_candidates_may_read_a_feature_set_and_selection_chooses_among_them(tmp_path: Path) -> None:
    """`features: PART`: a candidate reads only that part of a concatenated encoder's vectors (its layers are
    sized for it, the other part's columns never reach it), selection weighs it like any candidate, and the
    checkpoint reloads the view without rebuilding the encoders."""
    import torch

    from fusion_lightning.query.feature_view import view_columns

    views = [
        "~model.candidates", "~model.ensembles", "datamodule.encoder=[hashing,hashing-64]",
        "+model.candidates.lookup._target_=fusion_lightning.query.routers.residual.ResidualRouter",
        "+model.candidates.lookup.alphas=[0.0]", "+model.candidates.lookup.hidden_dims=[]",
        "+model.candidates.residual_all._target_=fusion_lightning.query.routers.residual.ResidualRouter",
        "+model.candidates.residual_64._target_=fusion_lightning.query.routers.residual.ResidualRouter",
        "+model.candidates.residual_64.features=hashing-64",
        "model.selection=holdout", "trainer.max_epochs=15",
    ]
    summary = fit(compose_recipe("router_auto", _subtopic(tmp_path, *views)))
    sel = summary["selection"]
    assert set(sel["val_reward"]) == {"lookup", "residual_all", "residual_64"}
    assert sel["winner"] in ("residual_all", "residual_64"), sel  # both views carry the planted sub-topics
    m = summary["metrics"]
    assert m["test/perf"] >= m["test/task_best/perf"] + 0.1, m
    router = Router.load(tmp_path / "run" / summary["artifacts"]["best_checkpoint"])
    module = router.module
    assert module.hparams.feature_columns == {"residual_64": list(range(256, 320))}
    assert module.candidates["residual_64"].hparams.embed_dim == 64
    assert module.candidates["residual_all"].hparams.embed_dim == 320
    x = torch.as_tensor(router.embed(["add the sum of these numbers plus digits", "which river crosses the city"]))
    task = router.task_ids(None, 2)
    module.winner.fill_(module.choices.index("residual_64"))
    noisy = x.clone()
    noisy[:, :256] = torch.randn(2, 256)  # the part residual_64 does not read
    own = x.clone()
    own[:, 256:] = torch.randn(2, 64)  # the part it reads
    assert float(module.candidates["residual_64"].alpha) > 0  # it learned something from its part
    with torch.no_grad():
        torch.testing.assert_close(module.predict(x, task), module.predict(noisy, task))
        assert not torch.allclose(module.predict(x, task)[0], module.predict(own, task)[0])
    with pytest.raises(ValueError, match="'minilm' is not a part of the encoder 'hashing&hashing-64'; its parts: "
                                         "hashing-256, hashing-64"):
        view_columns("minilm", "hashing&hashing-64")
