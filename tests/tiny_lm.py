"""A tiny random-initialised Llama causal LM with a tokenizer trained on the fly, saved as an ordinary
Hugging Face directory (config + safetensors + tokenizer with a chat template).

Tests that need "a student" or "a local model" build one with `build_tiny_lm(tmp_dir)` and then load
it exactly as a user loads a real model: `from_pretrained(path)`. No network, ~1 s.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

_CORPUS = [
    "What is two plus two? The answer is four.",
    "Tom has 12 apples and gives away 5. How many are left? 7 apples are left.",
    "Write a function that returns the sum of a list. def total(xs): return sum(xs)",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Question: which planet is largest? Answer: Jupiter is the largest planet.",
    "Let's think step by step. First add the numbers, then divide by the count.",
    "User: hello there\nAssistant: Hello! How can I help you today?",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { } : ; , . ? !",
]


def build_tokenizer(vocab_size: int = 384, chat_template: bool = True):
    """A byte-level BPE tokenizer (any text encodes) wrapped as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_lm(
    path: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 32,
    num_layers: int = 2,
    chat_template: bool = True,
) -> Path:
    """Write a tiny random Llama model + tokenizer to `path` and return it (loadable by `from_pretrained`).

    `initializer_range` is larger than Llama's default so the next-token distribution is peaked enough
    that greedy decoding is robust to float noise (batched vs unbatched, padded vs unpadded).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(chat_template=chat_template)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
