"""Generation with any Hugging Face causal LM, local directory or Hub name alike (same code path):
chat template when the tokenizer has one, batched with left padding, greedy or seeded sampling,
CPU or GPU, optional LoRA adapter. `generate(..., streams=[...])` also hands each prompt's text, as
it is decoded, to a callback: transformers' `TextIteratorStreamer` per row of the batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .base import Generation, Prompt, Sampling, StopTrim, resolve_sampling, to_messages, truncate_at_stop

Stream = Callable[[str], None]  # receives each piece of one answer's text as it is decoded

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _short_name(path_or_name: str) -> str:
    """A local directory is named by its last component; a Hub name is kept whole (org/model)."""
    p = Path(path_or_name.rstrip("/\\"))
    return p.name if p.exists() else path_or_name


def plain_chat_format(messages: Sequence[Mapping[str, Any]]) -> str:
    """The fallback prompt format for tokenizers without a chat template."""
    lines = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


PROMPT_FORMATS = ("auto", "chat", "completion")


def cut_completion(text: str) -> str:
    """A base model's answer ends at its first blank line after some text, as lm-eval-harness's
    generation tasks end a base model's answer (it goes on writing new questions). Leading blank lines
    are part of the answer, and a blank line inside an open code fence does not end it; so a stop
    string cannot do this. Reasoning in several paragraphs is cut after the first: use a chat model
    (or `prompt_format=chat`) for that."""
    start = next((i for i, c in enumerate(text) if not c.isspace()), len(text))
    i = start
    while (end := text.find("\n\n", i)) >= 0:
        if text.count("```", start, end) % 2 == 0:
            return text[:end]
        i = end + 2
    return text


def completion_format(messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt format of a base model (lm-eval-harness style): the text, then "Answer:" to complete.
    Earlier assistant turns are written as "Answer: ..."; role names are not (a base model imitates
    them and plays both sides of a dialogue)."""
    parts = [f"Answer: {m['content']}" if m["role"] == "assistant" else str(m["content"]) for m in messages]
    return "\n\n".join(parts) + "\n\nAnswer:"


class LocalBackend:
    """Serve a Hugging Face causal LM in-process.

    `model`: a local directory, a Hub name (`AutoModelForCausalLM.from_pretrained`) or a zoo name
    (`fusion_lightning.zoo`: its cached directory); `tokenizer` defaults to the same. `adapter`: a PEFT (LoRA) adapter directory applied on top. `device`:
    "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...; `prompt_format`: "auto" (the chat
    template when the tokenizer has one, else the zoo's format for the model, else "chat"), "chat" or
    "completion" (see `render`; a base model completes "Answer:" and stops at a blank line); `dtype`: "auto" (bfloat16 on a GPU
    that supports it, else float32), "float32", "float16" or "bfloat16". `sampling`: default
    sampling parameters, overridden per `generate` call.

    Greedy answers do not depend on `batch_size`; seeded sampled answers are reproducible for the
    same prompts, seed and `batch_size` (batch i is sampled with seed + i, prompts batched by length).
    `latency_s` of a prompt is the wall time of its batch.
    """

    def __init__(
        self,
        model: str,
        *,
        name: str | None = None,
        tokenizer: str | None = None,
        adapter: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        sampling: Mapping[str, Any] | None = None,
        progress: bool = True,
        trust_remote_code: bool = False,
        model_kwargs: Mapping[str, Any] | None = None,
        prompt_format: str = "auto",
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        from fusion_lightning.zoo import lookup, resolve

        # a zoo model's format; a fine-tuned copy in a directory is known by its zoo tokenizer
        zoo_model = next((z for x in (model, tokenizer) if x and not Path(str(x)).exists()
                          and (z := lookup(str(x)))), None)

        # a zoo name (python -m fusion_lightning.zoo list) is its cached directory, fetched on first use
        model = resolve(str(model))
        tokenizer, adapter = resolve(str(tokenizer)) if tokenizer else model, adapter and str(adapter)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
            dtype = "bfloat16" if cuda_bf16 else "float32"
        self.model_path, self.adapter, self.device, self.dtype = model, adapter, device, dtype
        self.batch_size, self.progress = batch_size, progress
        self.default_sampling = dict(sampling or {})
        resolve_sampling(self.default_sampling, {})  # fail early on bad defaults
        self.name = name or _short_name(model) + (f"+{_short_name(adapter)}" if adapter else "")

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            if self.tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer of {tokenizer!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(
            model, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code, **(model_kwargs or {})
        )
        if adapter:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, adapter)
        self.model.to(device).eval()
        if prompt_format == "auto":  # a chat template wins; else what the zoo knows of the model
            prompt_format = "chat" if self.has_chat_template else zoo_model.prompt_format if zoo_model else "chat"
        self.prompt_format = prompt_format

    def __repr__(self) -> str:
        return (
            f"LocalBackend(name={self.name!r}, model={self.model_path!r}, adapter={self.adapter!r}, "
            f"device={self.device!r}, dtype={self.dtype!r}, batch_size={self.batch_size}, "
            f"prompt_format={self.prompt_format!r})"
        )

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def _template_adds_specials(self) -> bool:
        return self.prompt_format == "chat" and self.has_chat_template

    def render(self, prompt: Prompt) -> str:
        """The exact text the model sees, by `prompt_format`: "chat" is the chat template with a
        generation prompt, or `plain_chat_format` ("User: ...\\nAssistant:") without one; "completion"
        is `completion_format` ("...\\n\\nAnswer:", for base models)."""
        messages = to_messages(prompt)
        if self.prompt_format == "completion":
            return completion_format(messages)
        if self.has_chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return plain_chat_format(messages)

    def _encode(self, texts: list[str]):
        # A chat template writes its own special tokens (BOS included); don't add them twice.
        return self.tokenizer(
            texts, return_tensors="pt", padding=True, add_special_tokens=not self._template_adds_specials
        )

    def generate(self, prompts: Sequence[Prompt], *, streams: Sequence[Stream | None] | None = None,
                 **sampling: Any) -> list[Generation]:
        """One `Generation` per prompt. `streams[i]`, when given, receives prompt i's answer piece by
        piece while the batch generates (cut at stop strings like the answer: the pieces add up to
        `text`)."""
        from tqdm.auto import tqdm

        if streams is not None and len(streams) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(streams)} streams")
        s = resolve_sampling(self.default_sampling, sampling)
        texts = [self.render(p) for p in prompts]
        lengths = [len(ids) for ids in self._encode_lengths(texts)]
        # Longest first: similar lengths share a batch (less padding) and OOM shows up at once.
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        results: list[Generation | None] = [None] * len(texts)
        bar = tqdm(batches, desc=f"generate {self.name}", unit="batch", disable=not self.progress or not batches)
        for b, idx in enumerate(bar):
            rows = None if streams is None else [streams[i] for i in idx]
            whole = self.prompt_format == "completion"  # its answer is cut only once it is whole: sent in one piece
            for i, gen in zip(idx, self._generate_batch([texts[i] for i in idx], s, b, None if whole else rows),
                              strict=True):
                results[i] = gen
                if whole and streams is not None and streams[i] is not None and gen.text:
                    streams[i](gen.text)
        return results  # type: ignore[return-value]

    def _encode_lengths(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=not self._template_adds_specials)["input_ids"]

    def _generate_batch(self, texts: list[str], s: Sampling, batch_index: int,
                        streams: list[Stream | None] | None = None) -> list[Generation]:
        import torch

        enc = self._encode(texts).to(self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": s.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "do_sample": not s.greedy,
        }
        if s.greedy:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        else:  # OpenAI semantics: temperature and nucleus only, no top-k
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        if self.prompt_format == "completion":  # stop each row at its blank line, not at max_new_tokens
            kwargs["stopping_criteria"] = [_BlankLineAfterText(self.tokenizer, enc["input_ids"].shape[1])]
        ends = {self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, *self._extra_eos()}
        if streams is not None and any(streams):
            kwargs["streamer"] = _row_streamer(self.tokenizer, streams, ends, s.stop)
        start = time.perf_counter()
        devices = [torch.device(self.device)] if self.device.startswith("cuda") else []
        with torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if s.seed is not None:
                torch.manual_seed(s.seed + batch_index)
            out = self.model.generate(**enc, **kwargs)
        latency = time.perf_counter() - start
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        n_in = enc["attention_mask"].sum(dim=1).tolist()
        gens = []
        for ids, n in zip(new, n_in, strict=True):
            k = next((j for j, t in enumerate(ids) if t in ends), len(ids))
            text = self.tokenizer.decode(ids[:k], skip_special_tokens=True)
            cut = truncate_at_stop(cut_completion(text) if self.prompt_format == "completion" else text, s.stop)
            finish = "stop" if k < len(ids) or len(cut) < len(text) else "length"
            gens.append(Generation(cut, int(n), k, latency, finish_reason=finish))
        return gens

    def _extra_eos(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class _BlankLineAfterText:
    """A `generate` stopping criterion: a row is done once its answer has a blank line after some text
    (what `cut_completion` cuts at), so a base model does not write new questions up to max_new_tokens."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.start = tokenizer, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([cut_completion(t) != t for t in texts], dtype=torch.bool, device=input_ids.device)


class _StreamSink:
    """Stands in for a TextIteratorStreamer's queue: text goes to the row's callback (cut at stop strings)."""

    def __init__(self, stream: Stream, stop: Sequence[str]):
        self.stream, self.trim = stream, StopTrim(stop)

    def put(self, item: str | None, timeout: float | None = None) -> None:
        piece = self.trim.flush() if item is None else self.trim.feed(item)  # None: the streamer's stop signal
        if piece:
            self.stream(piece)


def _row_streamer(tokenizer, streams: Sequence[Stream | None], ends: set[int], stop: Sequence[str]):
    """A `generate` streamer for a batch: one `TextIteratorStreamer` per streamed row (it decodes one
    sequence), fed that row's tokens up to its first end token, as the answer is cut."""
    from transformers import TextIteratorStreamer
    from transformers.generation.streamers import BaseStreamer

    class RowStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.rows: list[TextIteratorStreamer | None] = []
            for stream in streams:
                row = None
                if stream is not None:
                    row = TextIteratorStreamer(tokenizer, skip_special_tokens=True)
                    row.text_queue = _StreamSink(stream, stop)
                self.rows.append(row)
            self.prompt = True

        def put(self, value) -> None:
            if self.prompt:  # generate's first call hands over the prompt ids
                self.prompt = False
                return
            for i, row in enumerate(self.rows):
                if row is None:
                    continue
                if int(value[i]) in ends:
                    row.end()
                    self.rows[i] = None
                else:
                    row.put(value[i : i + 1])

        def end(self) -> None:
            for row in self.rows:
                if row is not None:
                    row.end()
            self.rows = [None] * len(self.rows)

    return RowStreamer()
