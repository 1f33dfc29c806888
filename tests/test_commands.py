"""The `key=value` commands collect, serve and evaluate: recipes/<command>.yaml composed by Hydra
(config.compose_command), with `config=FILE`, file keys and free-form sections. No server, no model:
each test composes, or runs a command that fails before doing any work (evaluate: a tiny synthetic log)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fusion_lightning import collect, evaluate, serve
from fusion_lightning.config import ConfigError, compose_command, recipes_dir
from fusion_lightning.serving.pipeline import PIPELINE_KEYS

COMMANDS = {"collect": collect, "serve": serve, "evaluate": evaluate}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_the_primary_config_documents_every_key(name):
    text = (recipes_dir() / f"{name}.yaml").read_text()
    keys = [k for k in yaml.safe_load(text) if k != "defaults"]
    for k in keys:  # every key has a comment on its line or is explained in a comment above
        line = next(x for x in text.splitlines() if x.startswith(f"{k}:"))
        assert "#" in line or k in ("port", "seed", "runs_root"), f"{name}.yaml: {k} has no comment"
    assert set(COMMANDS[name].compose()) == set(keys) | ({"data"} if name == "evaluate" else set())


def test_serve_config_holds_the_pipeline_keys_and_the_server_keys():
    keys = set(serve.compose())
    assert keys == set(PIPELINE_KEYS) | set(serve.SERVER_KEYS)


@pytest.mark.parametrize(("name", "argv", "valid"), [
    ("collect", ["queries=q.jsonl", "bogus=1"], "backends, catalog, chunk_size"),
    ("serve", ["port=0", "batch_wait=3"], "api_key_env, backends, batch_wait_ms"),
    ("evaluate", ["data=llmrouter", "routrs=[x]"], "bootstrap, ci_level, data, encoder, lam, max_per_task"),
])
def test_an_unknown_key_is_one_line_naming_the_valid_keys(name, argv, valid, capsys):
    assert COMMANDS[name].main(argv) == 1
    err = capsys.readouterr().err.strip()
    bad = argv[-1].split("=")[0]
    assert err.count("\n") == 0 and f"unknown config key {bad!r}" in err
    assert f"valid keys at the top level: {valid}" in err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help(name, capsys):
    assert COMMANDS[name].main(["--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m fusion_lightning.{name}" in out
    assert (recipes_dir() / f"{name}.yaml").read_text() in out  # the keys, their defaults and comments


@pytest.mark.parametrize(("name", "file", "argv", "want"), [
    ("collect", {"queries": "a.jsonl", "chunk_size": 8, "think": True}, ["chunk_size=4"],
     {"queries": "a.jsonl", "chunk_size": 4, "think": True}),
    ("serve", {"port": 9000, "router": {"ckpt": "r.ckpt"}, "host": "0.0.0.0"}, ["port=0", "router.lam=0.5"],
     {"port": 0, "router": {"ckpt": "r.ckpt", "lam": 0.5}, "host": "0.0.0.0"}),
    ("evaluate", {"data": "llmrouter", "lam": 0.5, "sampling": {"max_new_tokens": 8}},
     ["lam=0.1", "data.path=/logs", "sampling.temperature=0.2"],
     {"lam": 0.1, "sampling": {"max_new_tokens": 8, "temperature": 0.2}}),
])
def test_config_file_then_the_command_line_wins(tmp_path, name, file, argv, want):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(file))
    for args in ([f"config={path}", *argv], [*argv, f"config={path}"]):  # the order does not matter
        cfg = COMMANDS[name].compose(args)
        assert {k: cfg[k] for k in want} == want
    if name == "evaluate":  # `data: llmrouter` in the file is a group pick; data.path= then sets its key
        assert cfg["data"]["format"] == "llmrouter" and cfg["data"]["path"] == "/logs"
        assert COMMANDS[name].compose([f"config={path}", "data=routellm"])["data"]["format"] == "routellm"


def test_a_json_config_file_as_the_serving_benchmark_writes_it(tmp_path):
    path = tmp_path / "pipeline.json"
    path.write_text(json.dumps({"backends": [{"type": "rule", "name": "a"}], "router": {"ckpt": "r.ckpt"}}))
    cfg = serve.compose([f"config={path}", "port=0"])
    assert cfg["backends"] == [{"type": "rule", "name": "a"}] and cfg["router"] == {"ckpt": "r.ckpt"}


@pytest.mark.parametrize(("name", "key", "content"), [
    ("collect", "backends", [{"type": "openai_compatible", "base_url": "http://h/v1", "model": "m"}]),
    ("collect", "judge", {"type": "openai_compatible", "base_url": "http://h/v1", "model": "judge"}),
    ("serve", "router", {"ckpt": "r.ckpt", "lam": 0.1}),
    ("evaluate", "routers", {"mlp": "a.ckpt", "knn": "b.ckpt"}),
    ("evaluate", "sampling", {"max_new_tokens": 16}),
])
def test_a_file_key_given_a_yaml_file_loads_it(tmp_path, name, key, content):
    path = tmp_path / f"{key}.yaml"
    path.write_text(yaml.safe_dump(content))
    assert COMMANDS[name].compose([f"{key}={path}"])[key] == content
    # in a config= file too, and a dotted override after the file edits its content
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({key: str(path)}))
    assert COMMANDS[name].compose([f"config={base}"])[key] == content
    if isinstance(content, list):
        assert COMMANDS[name].compose([f"{key}={path}", f"{key}.0.model=other"])[key][0]["model"] == "other"


def test_free_form_sections_take_any_keys():
    cfg = evaluate.compose(["routers=[a.ckpt,b.ckpt]", "sampling.temperature=0.2", "+sampling.top_p=0.9",
                            "thought={backend:{type:rule}}", "thought.k=3"])
    assert cfg["routers"] == ["a.ckpt", "b.ckpt"] and cfg["sampling"] == {"temperature": 0.2, "top_p": 0.9}
    assert cfg["thought"] == {"backend": {"type": "rule"}, "k": 3}
    assert collect.compose(["judge={type:rule}", "judge.name=j"])["judge"] == {"type": "rule", "name": "j"}


@pytest.mark.parametrize(("argv", "file", "msg"), [
    (["data=nope"], None, "unknown data 'nope'; choose from: llmfusionbench, llmrouter"),
    (["data.bogus=1"], None, "unknown config key 'data.bogus' (use +data.bogus=... to add a new key); "
                             "valid keys under 'data': bandit, catalog"),
    (["data.val_fraction=abc"], None, "data.val_fraction=abc: Value 'abc' of type 'str' could not be converted"),
    (["lam=["], None, "no viable alternative at input '['"),
    (["config=FILE"], {"lam": 1, "bogus": 2}, "config=FILE: unknown config key 'bogus'; valid keys at the top level: bootstrap, ci_level, data"),
    (["config=FILE"], {"data": {"bogus": 2}}, "config=FILE: unknown config key 'data.bogus'; valid keys under 'data'"),
    (["config=FILE"], {"data": {"val_fraction": "abc"}}, "config=FILE: data.val_fraction: Value 'abc'"),
    (["config=FILE"], [1, 2], "config=FILE: expected a mapping of keys at the top level"),
    (["config=missing.yaml"], None, "config=missing.yaml: cannot read missing.yaml"),
    (["sampling=missing.json"], None, "sampling=missing.json: cannot read missing.json"),
])
def test_errors_are_one_line_naming_the_key_or_the_file(tmp_path, monkeypatch, argv, file, msg):
    monkeypatch.chdir(tmp_path)
    if file is not None:
        Path("FILE").write_text(yaml.safe_dump(file))
    with pytest.raises(ConfigError) as e:
        compose_command("evaluate", argv, file_keys=evaluate.FILE_KEYS)
    assert "\n" not in str(e.value) and msg in str(e.value), str(e.value)


def test_evaluate_runs_from_a_config_file(tmp_path, capsys):
    base = tmp_path / "eval.yaml"
    base.write_text(yaml.safe_dump({"data": {"synthetic": {"n_queries": 200, "models": 4}}, "max_per_task": 50,
                                    "out": str(tmp_path / "from_file")}))
    out = tmp_path / "ev"
    assert evaluate.main([f"config={base}", f"out={out}", "split=val"]) == 0
    assert f"run dir: {out}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "val" and summary["columns"][-1] == "oracle"
    assert not (tmp_path / "from_file").exists()
