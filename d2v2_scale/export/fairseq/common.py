"""What both fairseq importers share: reading a checkpoint safely (an allow-list, never arbitrary
unpickling), the refusal error, and the small checks and conversions both key mappings use."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import torch

from ...train import safe_load
from ..consolidate import ExportError


class ImportRefused(ExportError):
    """A fairseq checkpoint (or a config field of it) that the plain twin cannot represent."""


def load_fairseq(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) with numpy's allowlist (train/safe_load); never arbitrary unpickling."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist or is not a file")
    try:
        # fairseq pickles meter values and trainer state as numpy scalars: numpy's allowlist, no more
        ck = safe_load.load(path, allow=safe_load.numpy_globals())
    except safe_load.UnsafeCheckpointError as e:
        raise ImportRefused(f"{path}: refusing to unpickle {e.refused}: only tensors, plain containers and numpy "
                            f"scalars are allowed (a checkpoint that needs more is not a plain fairseq "
                            f"data2vec 2.0 file, or it is not safe to load)") from None
    except Exception as e:  # noqa: BLE001 - any other failure means a damaged or foreign file
        raise ExportError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("model"), dict) or not isinstance(ck.get("cfg"), dict):
        raise ImportRefused(f"{path}: not a fairseq hydra-era checkpoint (needs dict keys 'cfg' and 'model')")
    if not isinstance(ck["cfg"].get("model"), dict):
        raise ImportRefused(f"{path}: cfg.model is missing or not a dict")
    return ck


def parse_feature_spec(spec: str, where: str = "model.modalities.audio.feature_encoder_spec") -> list[list[int]]:
    """fairseq's feature_encoder_spec (2.0) / conv_feature_layers (1.0), e.g. "[(512, 10, 5)] +
    [(512, 3, 2)] * 4", -> [[C, k, s], ...].  Only int / tuple / list literals, `+` (list
    concatenation) and `*` (list repetition).  `where`: the config field, for the error message."""

    def ev(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [ev(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add) and isinstance(a, list) and isinstance(b, list):
                return a + b
            if isinstance(node.op, ast.Mult) and isinstance(a, list) and type(b) is int and 0 <= b <= 64:
                return a * b
        raise ImportRefused(f"{where} {spec!r}: not a list of (channels, kernel, stride) literals "
                            f"(only ints, tuples, lists, + and * are read; it is never evaluated)")

    try:
        tree = ast.parse(str(spec), mode="eval")
    except SyntaxError:
        raise ImportRefused(f"{where} {spec!r}: not a Python list expression") from None
    layers = ev(tree.body)
    if not isinstance(layers, list) or not layers or not all(
            isinstance(t, list) and len(t) == 3 and all(type(v) is int and v > 0 for v in t) for t in layers):
        raise ImportRefused(f"{where} {spec!r}: expected a non-empty list of (channels, kernel, stride) triples")
    return layers


def _need(cond: bool, field: str, value, why: str) -> None:
    if not cond:
        raise ImportRefused(f"{field}={value!r} is not supported: {why}")


def text_positions(v: torch.Tensor, mcfg: dict, where: str) -> torch.Tensor:
    """fairseq's learned position table [pad + 1 + max_positions, D] -> the twin's [max_positions, D]:
    fairseq numbers real tokens from row pad + 1 (rows 0..pad unused), the twin from row 0."""
    first, n = mcfg["pad_token_id"] + 1, mcfg["max_positions"]
    if v.shape[0] < first + n:
        raise ImportRefused(f"{where} has {v.shape[0]} rows, fewer than pad+1+max_source_positions = {first + n}")
    return v[first:first + n].clone()


def _check(tensors: dict, expected: dict, where: str) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ImportRefused(f"{where}: {unknown[:5]} do not exist in the plain twin of the file's config "
                            f"(depth/prenet_depth in cfg.model disagree with the tensors?)")
    bad = [(k, tuple(v.shape), expected[k]) for k, v in tensors.items() if tuple(v.shape) != expected[k]]
    if bad:
        raise ImportRefused(f"{where}: shape mismatch {bad[:3]} (name, file, twin of the file's config)")

