"""Generation backends behind one interface (`Backend.generate(prompts, **sampling) -> [Generation]`):

- `LocalBackend` (`type: local`): any Hugging Face causal LM in-process, optional LoRA adapter;
- `OpenAICompatibleBackend` (`type: openai_compatible`): any OpenAI chat-completions server, with
  concurrency, retries and a resumable disk cache.

`build_backend(cfg)` builds either from a config dict (what Hydra configs hold).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from .base import SAMPLING_KEYS, Backend, Generation, Prompt, Sampling, resolve_sampling, to_messages
from .openai_http import BackendError, OpenAICompatibleBackend, QueueFull

__all__ = [
    "SAMPLING_KEYS",
    "Backend",
    "BackendError",
    "Generation",
    "LocalBackend",
    "OpenAICompatibleBackend",
    "Prompt",
    "QueueFull",
    "Sampling",
    "build_backend",
    "resolve_sampling",
    "to_messages",
]


def __getattr__(name: str):  # LocalBackend imports torch/transformers lazily anyway; keep import cheap
    if name == "LocalBackend":
        from .local import LocalBackend

        return LocalBackend
    raise AttributeError(name)


def _backend_class(kind: str):
    if kind == "local":
        from .local import LocalBackend

        return LocalBackend
    if kind == "openai_compatible":
        return OpenAICompatibleBackend
    raise ValueError(f"unknown backend type {kind!r}; valid: ['local', 'openai_compatible']")


def build_backend(cfg: Mapping[str, Any]) -> Backend:
    """`{"type": "local" | "openai_compatible", **constructor arguments}` -> a backend.

    Accepts a plain dict or an OmegaConf config. Unknown keys are an error listing the valid ones;
    an `api_key` key is refused (put the key in an environment variable and name it in `api_key_env`).
    """
    if not isinstance(cfg, Mapping) or hasattr(cfg, "_metadata"):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    cfg = dict(cfg)
    if "type" not in cfg:
        raise ValueError("backend config needs 'type': 'local' or 'openai_compatible'")
    cls = _backend_class(str(cfg.pop("type")))
    if "api_key" in cfg:
        raise ValueError(
            "backend config must not hold the API key ('api_key'); put it in an environment variable "
            "and give that variable's name as 'api_key_env'"
        )
    params = inspect.signature(cls.__init__).parameters
    valid = [p for p in params if p != "self"]
    unknown = sorted(set(cfg) - set(valid))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} config key(s) {unknown}; valid: {valid}")
    return cls(**cfg)
