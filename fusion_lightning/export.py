"""`python -m fusion_lightning.export ckpt=PATH out=DIR [merge=true]`: a student checkpoint as a Hugging Face dir.

- full fine-tuning: DIR holds the fine-tuned weights + tokenizer;
- LoRA with merge=true: the adapter merged into the base weights (loads like any model; vLLM serves it);
- LoRA without: DIR holds the base weights + tokenizer and DIR/adapter the peft adapter
  (`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR), DIR/adapter)`, or vLLM's
  `--enable-lora --lora-modules student=DIR/adapter`).
A DeepSpeed ZeRO-3 checkpoint directory is consolidated into one state dict first.

The keys and their defaults are recipes/export.yaml (composed by Hydra, as `fit` is); the old `--ckpt PATH
--out DIR --merge` spelling still works for one release (a note says the new one).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch

from fusion_lightning.config import ConfigError, compose_command, help_requested, legacy_flags


def _load_checkpoint(ckpt: Path) -> dict:
    if ckpt.is_dir():  # DeepSpeed sharded checkpoint: consolidate (this also keeps hyper_parameters)
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            single = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(single))
            return torch.load(single, map_location="cpu", weights_only=False)  # written just now, by us
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def export_student(ckpt: str | Path, out: str | Path, merge: bool = False) -> Path:
    """Write the student of a distill_top_k checkpoint as a standard Hugging Face directory."""
    from transformers import AutoTokenizer

    from fusion_lightning.model.student import Student

    ckpt, out = Path(ckpt), Path(out)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint")
    state = _load_checkpoint(ckpt)
    if "student" not in state and "hyper_parameters" not in state:
        raise ValueError(f"{ckpt}: not a student checkpoint (no hyper_parameters)")
    hp = state["hyper_parameters"]
    student = Student(**hp)
    student.on_load_checkpoint(state)  # names any adapter weight the checkpoint lacks
    missing, unexpected = student.load_state_dict(state["state_dict"], strict=not hp.get("lora"))
    if unexpected:
        raise ValueError(f"{ckpt}: weights that this student does not have: {unexpected[:3]}")
    model = student.model
    out.mkdir(parents=True, exist_ok=True)
    if hp.get("lora"):
        if merge:
            model.merge_and_unload().save_pretrained(out)
        else:
            model.save_pretrained(out / "adapter")
            _save_base(hp["name_or_path"], out)
    else:
        model.save_pretrained(out)
    AutoTokenizer.from_pretrained(hp["name_or_path"]).save_pretrained(out)
    return out


def _save_base(name_or_path: str, out: Path) -> None:
    """The untouched base weights (the peft model's base layers are wrapped, so reload them cleanly)."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(name_or_path, torch_dtype=torch.float32).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if (code := help_requested(argv, __doc__, "export")) is not None:
        return code
    try:
        cfg = compose_command("export", legacy_flags(argv, {"--ckpt": "ckpt", "--out": "out", "--merge": "merge"},
                                                     switches=("--merge",)))
        for key in ("ckpt", "out"):
            if not cfg[key]:
                raise ConfigError(f"{key}= is required")
        if not isinstance(cfg["merge"], bool):
            raise ConfigError(f"merge={cfg['merge']}: true or false")
        out = export_student(str(cfg["ckpt"]), str(cfg["out"]), merge=bool(cfg["merge"]))
    except (ValueError, FileNotFoundError) as e:
        if os.environ.get("FUSION_LIGHTNING_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
