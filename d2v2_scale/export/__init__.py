"""Checkpoints -> one plain-PyTorch encoder (safetensors + JSON config), and a linear probe.

    d2v2-export RUN_OR_CHECKPOINT --out DIR [--which teacher|student] [--with-decoder] [--force]
    d2v2-export RUN_OR_CHECKPOINT_OR_EXPORT --out DIR --format hf   (export/hf.py: transformers folders)
    d2v2-probe  DIR --data MANIFEST [--pool mean|cls]

See docs/EXPORT.md.  `consolidate.export_checkpoint` does the work; `consolidate.load_export`
loads an export into `d2v2_scale.twins.encoder.PlainEncoder`.
"""

from .consolidate import ExportError, export_checkpoint, load_export, resolve_checkpoint

__all__ = ["ExportError", "export_checkpoint", "load_export", "resolve_checkpoint"]
