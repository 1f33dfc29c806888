"""The request log: every answer the server gives, as an LLMFusionBench JSONL record that `fit` reads.

    log_dir/requests-000001.jsonl, requests-000002.jsonl, ...    (a new file past `max_bytes`)

One record per answer (each of n choices is its own): the LLMFusionBench columns `task_name`, `query`,
`llm` (the backend that answered), `response`, `input_tokens_num`, `output_tokens_num`, `cost`
(micro-dollars, as LLMFusionBench has it; with a catalog), `input_price`/`output_price`, `metric`,
`performance` and `llm_judge` (null until feedback), and the serving fields `request_id`, `choice`,
`created`, `latency_s`, `served_as` (the model the client asked for), `stream`, `finish_reason`,
`task_source` ("request": the client's `task`; "router": inferred by the router's task classifier;
"default": neither knew, `default_task` is written) and `error` (a failed request, no response).
Two columns make the log a bandit log: `propensity`, the probability with which the serving policy
chose `llm` for this query (1.0 for `explore: none`, for serving without a router and for a request
that named a backend; every choice of an n > 1 request carries its request's), and `policy`, that
policy's id ("router:<ckpt hash>:epsilon=0.2", "default:<backend>", "direct:<backend>"; see
pipeline.py), so `fit` and off-policy estimators can weight each logged reward by how it was chosen.

Feedback (`RequestLog.feedback`, the server's `POST /v1/feedback`) appends the record again with its
score in `performance` (and `llm_judge`) and `feedback_at`: the later record of a
(`request_id`, `choice`) supersedes the earlier. The LLMFusionBench reader keeps the last record of
each and skips served answers that have no score yet, counted in the data report; so
`fit data=llmfusionbench data.path=LOG_DIR` trains on the scored traffic, and says how much is not.

Appends are whole lines: the writer thread (a reply never waits for the disk) writes each batch of
lines with one `write` to a file opened for appending, under a thread lock and `io.file_lock`, so
server processes that share a folder never interleave lines or rotate twice; a line a crash cut
short is ended before the next append, so it costs that one record (the reader names its line).

Feedback for a request another process answered (serve `workers=N`) is found in the files: this
process's own writes are flushed first, and with `find_wait_s` an id not found is looked for again
in the newest files for that long (the other process's writer thread may not have written it yet).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fusion_lightning.io import file_lock

log = logging.getLogger(__name__)
_SEGMENT = re.compile(r"^requests-(\d{6})\.jsonl$")
DEFAULT_TASK = "served"


def served_record(*, request_id: str, choice: int, query: str, task: str | None, task_source: str | None,
                  model: str, served_as: str, response: str, input_tokens: int | None,
                  output_tokens: int | None, latency_s: float, stream: bool, metric: str | None = None,
                  cost_usd: float | None = None, prices: tuple[float | None, float | None] = (None, None),
                  finish_reason: str | None = None, error: str | None = None,
                  default_task: str = DEFAULT_TASK, propensity: float = 1.0,
                  policy: str | None = None) -> dict[str, Any]:
    """One answer as an LLMFusionBench record (see the module docstring). `propensity` and `policy`
    describe how `model` was chosen; a record without a `policy` is one whose choice nobody logged."""
    return {
        "task_name": task or default_task, "task_source": task_source if task else "default",
        "query": query, "llm": model, "response": response,
        "input_tokens_num": input_tokens, "output_tokens_num": output_tokens,
        "cost": None if cost_usd is None else cost_usd * 1e6,  # LLMFusionBench logs micro-dollars
        "input_price": prices[0], "output_price": prices[1], "metric": metric, "ground_truth": None,
        "performance": None, "llm_judge": None, "propensity": float(propensity), "policy": policy,
        "request_id": request_id, "choice": choice, "created": time.time(), "latency_s": latency_s,
        "served_as": served_as, "stream": stream, "finish_reason": finish_reason, "error": error,
    }


class RequestLog:
    def __init__(self, root: str | os.PathLike, max_bytes: int = 64 << 20, remember: int = 100_000,
                 fsync: bool = False, find_wait_s: float = 0.0):
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
        self.root, self.max_bytes, self.fsync = Path(root), int(max_bytes), fsync
        self.find_wait_s = float(find_wait_s)  # how long to look again for an id that another process logs
        self.root.mkdir(parents=True, exist_ok=True)
        self._recent: OrderedDict[str, list[dict]] = OrderedDict()  # request id -> its records, by choice
        self._remember, self._lock = remember, threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fd: int | None = None
        self._path: Path | None = None
        self.written = 0  # lines written by this process
        self._writer = threading.Thread(target=self._loop, name="request-log", daemon=True)
        self._writer.start()

    def __repr__(self) -> str:
        return f"RequestLog({str(self.root)!r}, max_bytes={self.max_bytes})"

    @property
    def segments(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if _SEGMENT.match(p.name))

    # -- the server's side --------------------------------------------------------------------------
    def append(self, records: list[dict]) -> None:
        """Log the answers of one request (its choices, in order); returns at once."""
        if not records:
            return
        with self._lock:
            self._recent[records[0]["request_id"]] = list(records)
            while len(self._recent) > self._remember:
                self._recent.popitem(last=False)
        for r in records:
            self._queue.put(r)

    def feedback(self, request_id: str, score: float, choice: int = 0, judge: float | None = None) -> dict:
        """Score an answer: appends its record with `performance` (and `llm_judge`) set; returns it.
        KeyError for an unknown request id; ValueError for a bad score or choice, or a failed request."""
        for name, v in (("score", score), ("judge", judge)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1):
                raise ValueError(f"{name} must be a number in [0, 1], got {v!r}")
        records = self._find(request_id)
        if not 0 <= choice < len(records):
            raise ValueError(f"request {request_id} has choices 0..{len(records) - 1}, not {choice}")
        if records[choice].get("error"):
            raise ValueError(f"request {request_id} failed ({records[choice]['error']}): there is no answer to score")
        scored = {**records[choice], "performance": float(score),
                  "llm_judge": None if judge is None else float(judge), "feedback_at": time.time()}
        with self._lock:
            records[choice] = scored
        self._queue.put(scored)
        return scored

    def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything appended so far is on disk."""
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"request log {self.root}: writer did not catch up in {timeout:g} s")

    def close(self) -> None:
        if self._writer.is_alive():
            self.flush()
            self._queue.put(None)
            self._writer.join(10)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _find(self, request_id: str) -> list[dict]:
        with self._lock:
            if request_id in self._recent:
                return self._recent[request_id]
        self.flush()
        segments = self.segments
        found = _find_in(reversed(segments), request_id)
        deadline = time.monotonic() + self.find_wait_s
        while not found and time.monotonic() < deadline:  # another process may be about to write it
            time.sleep(0.02)
            newer = [p for p in self.segments if not segments or p >= segments[-1]]
            found = _find_in(reversed(newer), request_id)
        if not found:
            raise KeyError(request_id)
        records = [found[i] for i in sorted(found)]
        with self._lock:
            self._recent[request_id] = records
        return records

    # -- the writer thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            lines, waiters, stop = [], [], False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    waiters.append(item)
                else:
                    lines.append(json.dumps(item, ensure_ascii=False) + "\n")
                if stop or len(lines) >= 1000:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if lines:
                try:
                    self._write("".join(lines).encode("utf-8"))
                except OSError as e:  # the server keeps answering; the log says what it lost
                    log.error("request log %s: %d records not written: %s", self.root, len(lines), e)
            for w in waiters:
                w.set()
            if stop:
                return

    def _write(self, data: bytes) -> None:
        with file_lock(self.root / ".lock"):
            fd = self._segment(len(data))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        self.written += data.count(b"\n")

    def _segment(self, incoming: int) -> int:
        """The fd of the newest file, a new one when this write would take it past `max_bytes`
        (called under the file lock, so another process's rotation is seen)."""
        segments = self.segments
        newest = segments[-1] if segments else self.root / "requests-000001.jsonl"
        if newest.exists() and newest.stat().st_size and newest.stat().st_size + incoming > self.max_bytes:
            newest = self.root / f"requests-{int(_SEGMENT.match(newest.name).group(1)) + 1:06d}.jsonl"
        if newest != self._path:
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(newest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            self._path = newest
            size = os.fstat(self._fd).st_size
            if size:
                with open(newest, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":  # a line a crash cut short: end it, never glue a record to it
                        os.write(self._fd, b"\n")
        return self._fd


def _find_in(paths: Iterable[Path], request_id: str) -> dict[int, dict]:
    """The latest record of each choice of `request_id` in the first of `paths` (newest first) that has it."""
    found: dict[int, dict] = {}
    for path in paths:
        for rec in _records_of(path, request_id):
            found.setdefault(int(rec.get("choice") or 0), rec)
        if found:
            break
    return found


def _records_of(path: Path, request_id: str) -> Iterable[dict]:
    """The records of `request_id` in one file, last first."""
    needle = json.dumps(request_id)
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if needle in line:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("request_id") == request_id:
                    out.append(rec)
    return reversed(out)
