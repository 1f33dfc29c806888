"""Experiment tracking: logger=wandb offline runs (config, summary, tables, images; no secret in any file),
logger=tensorboard event files, and the secret redaction rules."""

from __future__ import annotations

import json
import secrets
import struct
import time
from pathlib import Path

import pytest
import yaml

from fusion_lightning.config import compose_recipe
from fusion_lightning.fit import fit
from fusion_lightning.tracking import REDACTED, is_secret_name, redact

SMALL = ["data.synthetic.n_queries=240", "data.synthetic.models=6", "trainer.max_epochs=2",
         "datamodule.encoder=hashing", "callbacks.progress_bar=null"]
ENV_KEY = "FL_TEST_OPENAI_API_KEY"  # not WANDB_API_KEY: that one would switch W&B online


def read_wandb_log(path: Path) -> dict[str, dict]:
    """The config and summary of a W&B offline run, from its run-*.wandb record log (LevelDB log blocks of
    protobuf Records: 7-byte file header, 32 KiB blocks, 7-byte record headers crc/length/type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", {"config": {}, "summary": {}}
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left
            continue
        if pos + 7 + length > len(data):
            break  # a record wandb-core is still appending (read_wandb_run reads again)
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind not in (1, 4):
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        kind_name = rec.WhichOneof("record_type")
        if kind_name in ("config", "summary"):
            for item in getattr(rec, kind_name).update:
                keys, node = list(item.nested_key) or [item.key], out[kind_name]
                for k in keys[:-1]:
                    node = node.setdefault(k, {})
                node[keys[-1]] = json.loads(item.value_json)
    return out


def read_wandb_run(run_dir: Path, *keys: str, timeout: float = 60.0) -> tuple[Path, dict[str, dict]]:
    """The offline run's files dir and records, once the summary holds `keys` (wandb-core appends to the
    record log asynchronously, shortly after `finish` returns)."""
    deadline = time.time() + timeout
    while True:
        log = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        record = read_wandb_log(log)
        if all(k in record["summary"] for k in keys) or time.time() > deadline:
            return log.parent / "files", record
        time.sleep(0.5)


def summary_models(run_dir: Path) -> list[str]:
    import torch

    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]["models"]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No W&B credentials anywhere (no key, empty netrc), every W&B folder inside tmp."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID", "SLURM_JOB_ID",
                "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        (tmp_path / var.lower()).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    return tmp_path


def test_wandb_preset_writes_an_offline_run_with_artefacts_and_no_secret(offline_wandb: Path, monkeypatch,
                                                                         capsys) -> None:
    env_secret = f"sk-test-{secrets.token_hex(12)}"
    literal_secret = f"hf_{secrets.token_hex(12)}"
    monkeypatch.setenv(ENV_KEY, env_secret)
    run_dir = offline_wandb / "run"
    summary = fit(compose_recipe("router_mlp", [
        *SMALL, "logger=wandb", f"run_dir={run_dir}", f"datamodule.embedding_cache={offline_wandb / 'cache'}",
        "logger.wandb.tags=[ci,router]", "logger.wandb.group=g1",
        f"+serving.api_key_env={ENV_KEY}",                      # a name: harmless, kept
        f"+serving.api_key=${{oc.env:{ENV_KEY}}}",              # a secret-named key: redacted
        f"+serving.headers=Bearer ${{oc.env:{ENV_KEY}}}",       # a secret env value inside a string: redacted
        f"+serving.hf_token={literal_secret}",                  # a literal secret in the config: redacted
    ]))
    assert "wandb sync" in capsys.readouterr().out
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())

    files, record = read_wandb_run(run_dir, "recipe", "tables/routing_table", "plots/pareto")
    logged = record["config"]["config"]
    assert logged["recipe"] == "router_mlp" and logged["seed"] == 42
    assert logged["serving"] == {"api_key_env": ENV_KEY, "api_key": REDACTED, "headers": f"Bearer {REDACTED}",
                                 "hf_token": REDACTED}
    assert record["config"]["models"] == summary_models(run_dir)  # the module's hparams, through Lightning
    on_disk = yaml.safe_load((run_dir / "config.yaml").read_text())  # the run dir's copy is redacted too
    assert on_disk["serving"]["api_key"] == REDACTED

    wsum = record["summary"]
    assert wsum["test/perf"] == pytest.approx(summary["metrics"]["test/perf"])
    assert wsum["recipe"] == "router_mlp"
    table = wsum["tables/routing_table"]
    assert table["_type"] == "table-file" and table["nrows"] > 0
    logged_table = json.loads((files / table["path"]).read_text())
    header = (run_dir / "routing_table.csv").read_text().splitlines()[0].split(",")
    assert logged_table["columns"] == header and len(logged_table["data"]) == table["nrows"]
    image = wsum["plots/pareto"]
    assert image["_type"] == "image-file" and (files / image["path"]).read_bytes()[:4] == b"\x89PNG"

    leaked = [str(p) for p in offline_wandb.rglob("*") if p.is_file()
              and (env_secret.encode() in p.read_bytes() or literal_secret.encode() in p.read_bytes())]
    assert leaked == []


def test_wandb_group_name_and_id_follow_the_slurm_job(offline_wandb: Path, monkeypatch) -> None:
    from hydra.utils import instantiate

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_recipe("router_mlp", ["logger=wandb", f"run_dir={offline_wandb / 'r'}"])
    logger = instantiate(cfg.logger.wandb)
    init = logger._wandb_init
    assert (init["group"], init["name"], init["id"], init["mode"]) == ("slurm-4242", "router_mlp-4242",
                                                                        "fusion_lightning-4242", "offline")
    assert init["resume"] == "allow" and init["tags"] == ["router_mlp"]  # a requeued job continues its run
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    assert instantiate(cfg.logger.wandb)._wandb_init["group"] == "sweep-7"


def test_tensorboard_preset_writes_scalars_images_and_text(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = fit(compose_recipe("router_mlp", [*SMALL, "logger=tensorboard", f"run_dir={tmp_path / 'run'}",
                                                f"datamodule.embedding_cache={tmp_path / 'cache'}"]))
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert acc.Scalars("test/perf")[-1].value == pytest.approx(summary["metrics"]["test/perf"], rel=1e-6)
    assert "pareto" in tags["images"]
    assert "routing_table/text_summary" in tags["tensors"]


def test_a_secret_on_the_command_line_keeps_wandb_metadata_off(offline_wandb: Path, monkeypatch) -> None:
    from hydra.utils import instantiate

    cfg = compose_recipe("router_mlp", ["logger=wandb", f"run_dir={offline_wandb / 'r'}"])
    monkeypatch.setattr("sys.argv", ["fit", "recipe=router_mlp", "seed=1"])
    assert "settings" not in instantiate(cfg.logger.wandb)._wandb_init
    monkeypatch.setattr("sys.argv", ["fit", "recipe=router_mlp", "+serving.api_key=sk-123456"])
    assert instantiate(cfg.logger.wandb)._wandb_init["settings"].x_disable_meta is True


@pytest.mark.parametrize(("name", "secret"), [
    ("api_key", True), ("OPENAI_API_KEY", True), ("apiKey", True), ("hf_token", True), ("HF_TOKEN", True),
    ("token", True), ("db_password", True), ("client_secret", True), ("AWS_SECRET_ACCESS_KEY", True),
    ("api_key_env", False), ("token_file", False), ("max_new_tokens", False), ("pad_token_id", False), ("tokenizer", False),
    ("input_tokens", False), ("key", False), ("encoder", False),
])
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_keys_and_values() -> None:
    cfg = {"a": {"api_key": "abc", "n": 3, "max_new_tokens": 8, "urls": ["x", "tok=SECRETVALUE1"]},
           "token": None, "note": "uses SECRETVALUE1 here"}
    assert redact(cfg, ["SECRETVALUE1"]) == {
        "a": {"api_key": REDACTED, "n": 3, "max_new_tokens": 8, "urls": ["x", f"tok={REDACTED}"]},
        "token": None, "note": f"uses {REDACTED} here"}


def test_wandb_logs_the_selection_report_and_student_eval_of_distill_top_k(offline_wandb: Path) -> None:
    run_dir = offline_wandb / "run"
    fit(compose_recipe("distill_top_k", [
        "data.synthetic.n_queries=60", "data.synthetic.models=3", "datamodule.max_length=64", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2", "callbacks.progress_bar=null",
        "callbacks.student_eval.max_queries=4", "callbacks.student_eval.max_new_tokens=4", "logger=wandb",
        f"run_dir={run_dir}"]))
    files, record = read_wandb_run(run_dir, "tables/selection_report", "tables/student_eval")
    wsum = record["summary"]
    selection = json.loads((files / wsum["tables/selection_report"]["path"]).read_text())
    assert selection["columns"] == ["split", "field", "key", "value"]
    report = json.loads((run_dir / "selection_report.json").read_text())
    want = {(s, f, "", v) for s, r in report.items() for f, v in r.items() if isinstance(v, int | float)}
    assert want and want <= {tuple(r) for r in selection["data"]}
    student = json.loads((files / wsum["tables/student_eval"]["path"]).read_text())
    assert student["columns"] == ["task", "queries", "base_perf", "student_perf"]
    assert len(student["data"]) == len((run_dir / "student_eval.csv").read_text().splitlines()) - 1
