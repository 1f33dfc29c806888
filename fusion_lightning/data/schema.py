"""The canonical multi-LLM log record and the model catalog (see DESIGN.md).

One row per (query, model) call. Every reader converts its source into these columns, so every
fusion level reads one shape of data.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Fields that repeat across a query's block or across queries are dictionary-encoded: a 1M-row log
# holds each query text once, and grouping by query/model/task reads the codes directly.
DICT = pa.dictionary(pa.int32(), pa.string())

LOG_SCHEMA = pa.schema(
    [
        ("query_id", DICT),
        ("query", DICT),
        ("task", DICT),
        ("domain", DICT),
        ("model", DICT),
        ("response", pa.string()),
        ("performance", pa.float64()),
        ("cost", pa.float64()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("judge", pa.float64()),
        ("ground_truth", DICT),
        ("metric", DICT),
        # bandit logs (what serving leaves behind): the probability with which the logging policy chose
        # this model for this query, and that policy's id (a checkpoint hash, an A/B arm)
        ("propensity", pa.float64()),
        ("policy", DICT),
    ]
)
LOG_FIELDS = tuple(LOG_SCHEMA.names)

# Provenance columns every reader adds, so an error can name the file and the row/line.
SOURCE_FIELDS = ("split", "_file", "_row")
SOURCE_SCHEMA = pa.schema([("split", DICT), ("_file", DICT), ("_row", pa.int64())])
FULL_SCHEMA = pa.schema(list(LOG_SCHEMA) + list(SOURCE_SCHEMA))

SPLITS = ("train", "val", "test")

# Task -> domain, for the LLMFusionBench tasks and the names other public logs use for them.
TASK_DOMAINS: dict[str, str] = {
    "gsm8k": "math",
    "math": "math",
    "agentverse-mgsm": "math",
    "mgsm": "math",
    "mbpp": "code",
    "human_eval": "code",
    "humaneval": "code",
    "commonsense_qa": "commonsense",
    "commonsenseqa": "commonsense",
    "arc_challenge": "commonsense",
    "arc-challenge": "commonsense",
    "hellaswag": "commonsense",
    "openbook_qa": "commonsense",
    "openbookqa": "commonsense",
    "commongen": "commonsense",
    "agentverse-logicgrid": "reasoning",
    "natural_qa": "world_knowledge",
    "naturalquestions": "world_knowledge",
    "nq": "world_knowledge",
    "trivia_qa": "world_knowledge",
    "triviaqa": "world_knowledge",
    "squad": "reading",
    "boolq": "reading",
    "mmlu": "popular",
    "gpqa": "popular",
}


_SUBTASK_SEPARATORS = ("_", "-", ".", ":", "/")


def known_task(task: str, names) -> str | None:
    """The entry of `names` that `task` is, or is a sub-task of: the longest name followed by a separator
    ('mmlu_abstract_algebra' and 'mmlu-college-physics' -> 'mmlu'); None when there is none. Case-insensitive."""
    t = task.strip().lower()
    if t in names:
        return t
    best = None
    for name in names:
        if len(t) > len(name) and t.startswith(name) and t[len(name)] in _SUBTASK_SEPARATORS and (
                best is None or len(name) > len(best)):
            best = name
    return best


def domain_of(task: str) -> str:
    """Domain of a task name, or of the task it is a sub-task of ('mmlu_anatomy' -> mmlu's); 'other' for tasks
    the built-in map does not know."""
    name = known_task(task, TASK_DOMAINS)
    return TASK_DOMAINS[name] if name else "other"


def make_query_id(task: str | None, query: str) -> str:
    """Stable content id for sources that carry none: hash of task + query text."""
    h = hashlib.sha1(f"{task or ''}\x1f{query}".encode()).hexdigest()
    return f"q{h[:16]}"


def make_query_ids(tasks: pa.Array, queries: pa.Array) -> pa.Array:
    """`make_query_id` of many distinct (task, query) pairs (null = ""), distinct ids guaranteed (a 64-bit
    collision raises). pyarrow joins, Python only hashes (over slices of one buffer), numpy writes the hex."""
    joined = pc.binary_join_element_wise(pc.fill_null(tasks.cast(pa.string()), ""),
                                         pc.fill_null(queries.cast(pa.string()), ""), "\x1f")
    joined = joined.combine_chunks() if isinstance(joined, pa.ChunkedArray) else joined
    n = len(joined)
    if n == 0:
        return pa.array([], pa.string())
    offsets = np.frombuffer(joined.buffers()[1], np.int32, n + 1, joined.offset * 4).tolist()
    data = memoryview(joined.buffers()[2] or b"")
    sha1 = hashlib.sha1
    digests = np.frombuffer(b"".join([sha1(data[a:b]).digest() for a, b in zip(offsets, offsets[1:], strict=False)]),
                            np.uint8)
    head = digests.reshape(n, 20)[:, :8]  # the first 16 hex digits
    if len(np.unique(np.ascontiguousarray(head).view(np.uint64))) < n:  # two pairs, one id: never merge silently
        ids = [f"q{bytes(d).hex()}" for d in head]
        first = {}
        for i, q in enumerate(ids):
            if first.setdefault(q, i) != i:
                raise ValueError(f"query id {q} collides: {joined[first[q]].as_py()!r} and {joined[i].as_py()!r}")
    hexchars = np.frombuffer(b"0123456789abcdef", np.uint8)
    out = np.empty((n, 17), np.uint8)
    out[:, 0] = ord("q")
    out[:, 1::2] = hexchars[head >> 4]
    out[:, 2::2] = hexchars[head & 15]
    return pa.StringArray.from_buffers(n, pa.py_buffer(np.arange(0, 17 * n + 1, 17, dtype=np.int32)),
                                       pa.py_buffer(out))


_SIZE_RE = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)\s*[bB]\b")


def parse_param_count(text: str | None) -> float | None:
    """Billions of parameters from '7B', '8x22b', 'llama-3.1-70b-instruct'; None when absent."""
    if not text:
        return None
    m = _SIZE_RE.search(text.replace("_", "-").replace("-", " "))
    if not m:
        return None
    experts = float(m.group(1)) if m.group(1) else 1.0
    return experts * float(m.group(2))


@dataclass
class ModelInfo:
    """One catalog entry; prices are USD per million tokens."""

    name: str
    params_b: float | None = None
    input_price: float | None = None
    output_price: float | None = None
    description: str = ""
    base_model: str | None = None  # e.g. 'x' for the reasoning-prompt variant 'x_think'

    def call_cost(self, input_tokens: int | None, output_tokens: int | None) -> float | None:
        """USD for one call from token counts; None when prices or all token counts are unknown."""
        if self.input_price is None or self.output_price is None:
            return None
        if input_tokens is None and output_tokens is None:
            return None
        return ((input_tokens or 0) * self.input_price + (output_tokens or 0) * self.output_price) / 1e6


@dataclass
class ModelCatalog:
    """The models a log may name, with sizes, prices and descriptions."""

    models: dict[str, ModelInfo] = field(default_factory=dict)
    source: str = "inferred"

    def __contains__(self, name: str) -> bool:
        return name in self.models

    def __getitem__(self, name: str) -> ModelInfo:
        return self.models[name]

    def __len__(self) -> int:
        return len(self.models)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def add(self, info: ModelInfo) -> None:
        self.models[info.name] = info

    def to_json(self) -> str:
        return json.dumps({n: asdict(m) for n, m in self.models.items()}, indent=2)

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelCatalog:
        """Read a catalog: our own format, or LLMRouter's `llm_candidates.json` (size/feature/prices)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read model catalog: {e}") from e
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: model catalog must be a JSON object of name -> entry")
        cat = cls(source=str(path))
        for name, e in raw.items():
            if not isinstance(e, dict):
                raise ValueError(f"{path}: catalog entry {name!r} must be an object")
            params = e.get("params_b")
            if params is None:
                params = parse_param_count(str(e.get("size") or "")) or parse_param_count(name)
            cat.add(
                ModelInfo(
                    name=name,
                    params_b=params,
                    input_price=_opt_float(e.get("input_price"), path, name, "input_price"),
                    output_price=_opt_float(e.get("output_price"), path, name, "output_price"),
                    description=str(e.get("description") or e.get("feature") or ""),
                    base_model=e.get("base_model"),
                )
            )
        return cat


def _opt_float(v, path: Path, name: str, fld: str) -> float | None:
    if v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: catalog entry {name!r}: field {fld!r} is not a number: {v!r}") from None
    if x < 0:
        raise ValueError(f"{path}: catalog entry {name!r}: field {fld!r} is negative: {x}")
    return x
