"""The generation-backend interface shared by the local (Hugging Face) and HTTP (OpenAI-compatible)
backends: a prompt is a user string or a chat message list, a call returns one `Generation` per
prompt in input order, sampling parameters are the same for every backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Prompt = str | list[dict]
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "stop")


@dataclass
class Generation:
    """One response. `error` is set (and `text` empty) when the backend gave up on this prompt."""

    text: str
    input_tokens: int | None
    output_tokens: int | None
    latency_s: float
    cached: bool = False
    error: str | None = None
    finish_reason: str | None = None  # OpenAI's: "stop" (an end token or a stop string), "length"


@dataclass
class Chunk:
    """One event of a streamed answer: `text` appended to choice `index`; the choice's last event
    carries its whole `generation` (token counts, finish reason, latency; `text` is then "")."""

    index: int = 0
    text: str = ""
    generation: Generation | None = None


@runtime_checkable
class Backend(Protocol):
    """Anything that answers prompts; `name` is the model name recorded in logs."""

    name: str

    def generate(self, prompts: Sequence[Prompt], **sampling: Any) -> list[Generation]: ...


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters with OpenAI semantics: temperature 0 is greedy; `stop` strings end the
    answer and are not part of it; `seed` makes sampled answers reproducible."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def resolve_sampling(defaults: Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> Sampling:
    """Per-call `overrides` over backend `defaults` over `Sampling`'s defaults; unknown keys are errors."""
    merged = {**(defaults or {}), **overrides}
    unknown = sorted(set(merged) - set(SAMPLING_KEYS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; valid: {list(SAMPLING_KEYS)}")
    merged = {k: v for k, v in merged.items() if v is not None or k == "seed"}
    stop = merged.get("stop", ())
    merged["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())
    # canonical types: 0 and 0.0 must be the same request (cache keys hash the JSON)
    for k, cast in (("max_new_tokens", int), ("temperature", float), ("top_p", float)):
        if k in merged:
            merged[k] = cast(merged[k])
    if merged.get("seed") is not None:
        merged["seed"] = int(merged["seed"])
    s = Sampling(**merged)
    if s.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {s.max_new_tokens}")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {s.temperature}, {s.top_p}")
    return s


def to_messages(prompt: Prompt) -> list[dict]:
    """A plain string is one user message; a message list is validated and copied."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not prompt:
        raise TypeError(f"a prompt is a string or a non-empty list of messages, got {type(prompt).__name__}")
    for m in prompt:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TypeError(f"a chat message is a dict with 'role' and 'content', got {m!r}"[:300])
    return [dict(m) for m in prompt]


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut `text` at the earliest stop string (exclusive), as OpenAI-style servers do."""
    cut = min((i for s in stop if s and (i := text.find(s)) >= 0), default=-1)
    return text if cut < 0 else text[:cut]


class StopTrim:
    """Streamed text cut at the earliest stop string, exactly as `truncate_at_stop` cuts a whole answer:
    it holds back the last `len(longest stop) - 1` characters until they cannot begin a stop string."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buf, self.done = "", False

    def feed(self, text: str) -> str:
        """The part of `text` (after what was held back) that is safe to send now."""
        if self.done or not self.stop:
            return "" if self.done else text
        self.buf += text
        cut = truncate_at_stop(self.buf, self.stop)
        if len(cut) < len(self.buf):
            self.buf, self.done = "", True
            return cut
        out = self.buf[: len(self.buf) - self.hold]
        self.buf = self.buf[len(out):]
        return out

    def flush(self) -> str:
        """What is still held back, at the end of the stream."""
        out, self.buf = ("" if self.done else self.buf), ""
        return out
