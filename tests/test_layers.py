"""Parts that know only what they should: the import rules between the package's parts, read from the
source with `ast` (nothing is imported, so a lazy import inside a function counts like any other).

A part may import itself, the package root and the parts `MAY_IMPORT` names, nothing else:

- `io` (atomic writes, file locks) and `cache` (where the cache folder is) sit below everything and import
  nothing of the package;
- `scoring/` is pure functions of (response, ground truth): it imports nothing else of the package;
- `data/` (readers, validation, LogTable, embeddings, re-scoring, response ranking) may use scoring only;
- `zoo/` (the offline models: registry, fetch, builders; `python -m fusion_lightning.zoo` is its
  `__main__`) may use data only; the loaders above it (serving's local backend, the students) resolve names through it;
- `serving/`'s clients (backends, cache, judge, collect) may use data and scoring, never a level;
- the three levels (`query/`, `thought/`, `model/`) build on data and scoring and never import each
  other; only the thought level asks an LLM (its LLM summariser is a serving client);
- `callbacks/` and the compositions (`serving/pipeline.py`, `fusion_table.py`) put levels together;
- run support (config, checkpointing, tracking) imports only itself and data's config
  schema, and serves the CLIs;
- the CLIs (top-level modules run as `python -m fusion_lightning.NAME`) may import anything, and no
  module but a CLI imports a CLI (or a composition, a callback or run support).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusion_lightning"
LEVELS = ("query", "thought", "model")
COMPOSITIONS = {"fusion_lightning.serving.pipeline", "fusion_lightning.fusion_table"}
SUPPORT = {"fusion_lightning.config", "fusion_lightning.checkpointing", "fusion_lightning.tracking"}
UTIL = {"fusion_lightning.io", "fusion_lightning.cache"}  # file writes and locks, the cache root: below everything
PARTS = ("root", "util", "scoring", "data", "zoo", "serving", *LEVELS, "callbacks", "composition", "support", "cli")
BASE = {"util", "data", "scoring", "zoo"}
MAY_IMPORT: dict[str, set[str]] = {
    "root": set(),
    "util": set(),
    "scoring": set(),
    "data": {"util", "scoring"},
    "zoo": {"util", "data"},  # the offline models; tiny-llama's tokenizer is trained on the synthetic log (data/)
    "serving": BASE,
    "query": BASE,
    "thought": BASE | {"serving"},  # thought/summarise.py: LLMSummariser over build_backend
    "model": BASE,
    "callbacks": BASE | {"serving", *LEVELS, "support"},  # slurm.py works with checkpointing's FaultTolerance
    "composition": BASE | {"serving", *LEVELS},
    "support": {"util", "data"},  # config.py registers the `data` config schema (data/source.py) with Hydra
    "cli": set(PARTS),
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_cli(tree: ast.Module) -> bool:
    """A module with an `if __name__ == "__main__":` block."""
    return any(isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and isinstance(n.test.left, ast.Name)
               and n.test.left.id == "__name__" for n in tree.body)


def part_of(module: str, tree: ast.Module) -> str | None:
    """The part a module belongs to; None for a top-level module no rule covers yet."""
    if module == "fusion_lightning":
        return "root"
    if module in COMPOSITIONS:
        return "composition"
    if module in SUPPORT:
        return "support"
    if module in UTIL:
        return "util"
    top = module.split(".")[1]
    if top in ("scoring", "data", "zoo", "serving", "callbacks", *LEVELS):
        return top
    return "cli" if module.count(".") == 1 and is_cli(tree) else None


def imports(module: str, tree: ast.Module, is_package: bool, known: set[str]) -> list[tuple[int, str]]:
    """(line, module imported) for every import of a package module in `tree`, lazy ones included;
    `from X import name` names module X.name where that is a module."""
    out = []
    here = module if is_package else module.rsplit(".", 1)[0]
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(n.lineno, a.name) for a in n.names if a.name.split(".")[0] == "fusion_lightning"]
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = here.split(".")[: len(here.split(".")) - (n.level - 1)]
                source = ".".join(base + ([n.module] if n.module else []))
            else:
                source = n.module or ""
            if source.split(".")[0] != "fusion_lightning":
                continue
            subs = [f"{source}.{a.name}" for a in n.names if f"{source}.{a.name}" in known]
            out += [(n.lineno, s) for s in subs] or [(n.lineno, source)]
    return out


def parse_package(package: Path = PACKAGE) -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p, package): (p, ast.parse(p.read_text(encoding="utf-8"), str(p)))
            for p in sorted(package.rglob("*.py"))}


def violations(modules: dict[str, tuple[Path, ast.Module]], package: Path = PACKAGE) -> list[str]:
    known = set(modules)
    parts = {m: part_of(m, tree) for m, (_, tree) in modules.items()}
    out = []
    for module, (path, tree) in modules.items():
        part = parts[module]
        if part is None:
            out.append(f"{module}: a top-level module that is neither a CLI (no `if __name__ == \"__main__\"`) "
                       "nor listed in tests/test_layers.py (COMPOSITIONS or SUPPORT): classify it")
            continue
        allowed = MAY_IMPORT[part] | {part, "root"}
        for line, target in imports(module, tree, path.name == "__init__.py", known):
            target_part = parts.get(target) or parts.get(target.rsplit(".", 1)[0])
            if target_part is None:
                out.append(f"{path.relative_to(package.parent)}:{line}: imports {target}, which is not a module "
                           "of the package")
            elif target_part not in allowed:
                may = ", ".join(sorted(MAY_IMPORT[part])) or "nothing else of the package"
                out.append(f"{path.relative_to(package.parent)}:{line}: {module} ({part}) imports {target} "
                           f"({target_part}); {part} may import: {may}")
    return out


def test_every_module_keeps_the_import_rules():
    modules = parse_package()
    assert len(modules) > 50 and "fusion_lightning.fit" in modules  # the right tree was read
    found = violations(modules)
    assert not found, "forbidden imports between parts (see tests/test_layers.py):\n  " + "\n  ".join(found)


def test_the_rules_form_layers():
    """No two parts may import each other, directly or round a loop (the CLIs aside, which import all)."""
    assert set(MAY_IMPORT) == set(PARTS)
    for level in LEVELS:
        assert not MAY_IMPORT[level] & set(LEVELS), f"{level} may import another level"
    graph = {p: MAY_IMPORT[p] - {p} for p in PARTS if p != "cli"}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(q == goal or (q not in seen and reaches(q, goal, seen | {q})) for q in graph.get(start, ()))

    loops = [p for p in graph if reaches(p, p, set())]
    assert not loops, f"the import rules go round a loop through {loops}"
    assert not any("cli" in MAY_IMPORT[p] for p in PARTS if p != "cli")


def import_cycles(modules: dict[str, tuple[Path, ast.Module]]) -> list[list[str]]:
    """Groups of modules that import each other round a loop (strongly connected components of the
    module import graph, lazy imports included): a cycle inside a part is a tangle the layer rules miss."""
    known = set(modules)
    graph = {m: sorted({t if t in known else t.rsplit(".", 1)[0]
                        for _, t in imports(m, tree, path.name == "__init__.py", known)} & known - {m})
             for m, (path, tree) in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_itself_round_a_loop():
    cycles = import_cycles(parse_package())
    assert not cycles, "import cycles (lazy imports count): " + "; ".join(" <-> ".join(c) for c in cycles)


def test_a_planted_cycle_inside_a_part_is_found(tmp_path: Path):
    pkg = tmp_path / "fusion_lightning"
    (pkg / "data").mkdir(parents=True)
    for f in ("__init__.py", "data/__init__.py"):
        (pkg / f).write_text("")
    (pkg / "data" / "a.py").write_text("from fusion_lightning.data import b\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from fusion_lightning.data.a import g\n")
    (pkg / "data" / "c.py").write_text("from fusion_lightning.data.a import g\n")
    assert import_cycles(parse_package(pkg)) == [["fusion_lightning.data.a", "fusion_lightning.data.b"]]


def test_the_clis_are_the_documented_commands():
    modules = parse_package()
    clis = {m.split(".")[1] for m, (_, tree) in modules.items() if part_of(m, tree) == "cli"}
    from fusion_lightning.cli import COMMANDS  # the one list of commands (`fusion-lightning COMMAND`)

    # the zoo's CLI is its package's __main__ (part zoo); cli.py is the dispatcher itself
    assert clis == (set(COMMANDS) - {"zoo"}) | {"cli"}


SOURCES = {
    "query/leak.py": "from fusion_lightning.model.sft import pack\n",
    "thought/leak.py": "def f():\n    from ..query import router\n",
    "model/leak.py": "import fusion_lightning.serving.pipeline as p\n",
    "scoring/leak.py": "from fusion_lightning.data import arrow\n",
    "data/leak.py": "from fusion_lightning import config\n",
    "serving/leak.py": "from fusion_lightning.thought.prompt import TemplateAugmenter\n",
    "query/fine.py": "from fusion_lightning.data.arrow import codes\nfrom . import leak\n",
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_the_checker_sees_each_kind_of_import(tmp_path, name):
    """The checker itself: absolute, relative, lazy and `import a.b as c` imports are all caught."""
    package = tmp_path / "fusion_lightning"
    for rel in ["__init__.py", "config.py", *[f"{p}/__init__.py" for p in ("query", "thought", "model", "scoring",
                                                                             "data", "serving")],
                "model/sft.py", "query/router.py", "data/arrow.py", "serving/pipeline.py", "thought/prompt.py"]:
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).touch()
    (package / name).write_text(SOURCES[name])
    (package / "query/leak.py").touch(exist_ok=True)
    found = [v for v in violations(parse_package(package), package) if name.replace("/", ".").removesuffix(".py") in v]
    assert bool(found) == ("leak" in name), found
