"""The packed export format (docs/export.md, "Packed format"): reading it, and the bit packing both sides share.

A packed export is a folder with manifest.json (graph, tensors, scales, where each array lives),
weights.bin (every layer's integer weights bit-packed at their own bit width) and tables.bin
(int32 tables per resolution and float32 weight steps). Numpy only.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import RsqError
from .model import IntegerModel, Op, QuantWeight, TensorInfo

FORMAT = "rsq-packed"
VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.bin"
TABLES = "tables.bin"
ALIGN = 8  # every array starts at a multiple of 8 bytes in its file


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Signed integers as ``bits``-bit two's complement, LSB-first into a little-endian bit stream."""
    flat = values.astype(np.int64).reshape(-1)
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if flat.size and (flat.min() < low or flat.max() > high):
        raise ValueError(f"values outside the signed {bits}-bit range")
    unsigned = flat & (2**bits - 1)
    stream = ((unsigned[:, None] >> np.arange(bits)) & 1).astype(np.uint8)  # [n, bits], bit 0 first
    return np.packbits(stream.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """The inverse of pack_bits: ``count`` int8 values."""
    stream = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[:count * bits]
    if stream.size != count * bits:
        raise RsqError(f"packed weights are truncated ({len(data)} bytes for {count} {bits}-bit values)")
    unsigned = stream.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    signed = np.where(unsigned >= 2 ** (bits - 1), unsigned - 2**bits, unsigned)
    return signed.astype(np.int8)


def packed_size(count: int, bits: int) -> int:
    return -(-count * bits // 8)


def read_packed(folder) -> IntegerModel:
    """An IntegerModel from a packed export folder, with clear errors for a foreign or damaged one."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise RsqError(f"{folder} is not a packed rsq export (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_path.read_text())
        weights_blob = (folder / WEIGHTS).read_bytes()
        tables_blob = (folder / TABLES).read_bytes()
    except (OSError, ValueError) as exc:
        raise RsqError(f"cannot read packed export {folder}: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise RsqError(f"{manifest_path} is not an {FORMAT} manifest")
    if manifest.get("version", 0) > VERSION:
        raise RsqError(f"{manifest_path} was written by a newer rsq (version {manifest['version']} > {VERSION})")
    try:
        return _model_from(manifest, weights_blob, tables_blob)
    except (KeyError, TypeError, ValueError) as exc:
        raise RsqError(f"{manifest_path} is damaged: {exc!r}") from None


def _array(blob: bytes, entry: dict) -> np.ndarray:
    dtype = np.dtype(entry["dtype"]).newbyteorder("<")
    end = entry["offset"] + entry["count"] * dtype.itemsize
    if end > len(blob):
        raise RsqError(f"a table array ends at byte {end}, past the end of its file ({len(blob)} bytes)")
    values = np.frombuffer(blob, dtype=dtype, count=entry["count"], offset=entry["offset"])
    return values.astype(dtype.newbyteorder("="))


def _model_from(manifest: dict, weights_blob: bytes, tables_blob: bytes) -> IntegerModel:
    tensors = {t["name"]: TensorInfo(t["name"], t["kind"], t["bits"], t["signed"], t["channels"])
               for t in manifest["tensors"]}
    ops = tuple(Op(o["kind"], o["name"], tuple(o["inputs"]), o["output"], o["attrs"]) for o in manifest["ops"])
    weights = {}
    for w in manifest["weights"]:
        count = int(np.prod(w["shape"]))
        data = weights_blob[w["offset"]:w["offset"] + w["nbytes"]]
        values = unpack_bits(data, w["bits"], count).reshape(w["shape"])
        weights[w["name"]] = QuantWeight(values, w["bits"], _array(tables_blob, w["step"]))
    tables = {}
    for r, per_op in manifest["tables"].items():
        tables[int(r)] = {op: {k: _array(tables_blob, e) for k, e in entries.items()} for op, entries in per_op.items()}
    scales = {int(r): {k: float(v) for k, v in s.items()} for r, s in manifest["scales"].items()}
    meta = dict(manifest.get("meta", {}))
    described = {k: v for k, v in manifest["input"].items() if k not in ("tensor", "layout", "quantize")}
    if described:
        meta["input"] = described  # mean/std live in the manifest's "input" section, as the writer put them
    return IntegerModel(manifest["model"], manifest["num_classes"], manifest["in_chans"],
                        tuple(manifest["resolutions"]), manifest["input"]["tensor"], manifest["output"]["tensor"],
                        tensors, ops, weights, tables, scales, meta)
