"""fusion_lightning: fuse many LLMs from the logs they leave behind."""

__version__ = "0.1.0"
