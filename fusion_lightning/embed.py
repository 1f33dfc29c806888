"""`python -m fusion_lightning.embed data=NAME encoder=SPEC out=DIR [key=value ...]`: embed a log's queries.

The same run as `python -m fusion_lightning.fit recipe=embed ...` (recipes/recipe/embed.yaml): a Lightning
`trainer.predict` whose ShardWriter writes content-addressed shards into the embedding cache under
`out` (`out/<encoder>/shard-*.npz`), so a later `fit ... datamodule.embedding_cache=DIR` (the same
folder, the default for both) embeds nothing. Being a fit recipe, it runs unchanged on one CPU, with
`trainer.devices=N` (DDP: each rank writes its own shards), and on a cluster with
`python -m fusion_lightning.submit recipe=embed slurm.nodes=N slurm.gpus_per_node=G`. Re-running the same
command after a kill skips the finished shards; texts already cached are never embedded again.

  encoder=minilm | minilm+onnx | minilm+onnx-int8 (ONNX Runtime, the fast CPU path) | hashing | PATH
          (+lenN: max_seq_length N tokens, e.g. minilm+onnx-int8+len128)
  datamodule.batch_size=auto   datamodule.shard_size=1024   progress_interval=30   trainer.devices=2
"""

from __future__ import annotations

import sys

from fusion_lightning import fit


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    if not any(a.startswith("recipe=") for a in argv):  # DDP ranks re-run this command with it already added
        argv = ["recipe=embed", *argv]
    elif [a for a in argv if a.startswith("recipe=")] != ["recipe=embed"]:
        print("error: the embed command runs recipe=embed only (use fusion_lightning.fit for others)",
              file=sys.stderr)
        return 2
    return fit.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
