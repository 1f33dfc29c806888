"""Student models by name: any Hugging Face path or name, or a zoo name (fusion_lightning.zoo:
`tiny-llama`, `smollm2-135m-instruct`, `gemma-3-270m`, built or fetched once, then cached). Whatever
the name, the result is a directory (or hub name) that `from_pretrained` loads: one code path for all
students.
"""

from __future__ import annotations


def resolve_student(name_or_path: str) -> str:
    """A directory `from_pretrained` can load for a zoo name (fusion_lightning.zoo: built once, then
    cached); any other name or path as is."""
    from fusion_lightning.zoo import resolve

    return resolve(name_or_path)
