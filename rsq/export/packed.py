"""Packed writer: an IntegerModel as manifest.json + bit-packed weights.bin + tables.bin (docs/export.md)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..runtime.model import IntegerModel
from ..runtime.packed import ALIGN, FORMAT, MANIFEST, TABLES, VERSION, WEIGHTS, pack_bits


class _Blob:
    """Bytes appended at aligned offsets; each append returns its manifest entry."""

    def __init__(self):
        self.data = bytearray()

    def _align(self) -> int:
        self.data.extend(b"\0" * (-len(self.data) % ALIGN))
        return len(self.data)

    def add_array(self, array: np.ndarray) -> dict:
        little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
        offset = self._align()
        self.data.extend(little.reshape(-1).tobytes())
        return {"offset": offset, "count": int(array.size), "dtype": array.dtype.newbyteorder("<").str}

    def add_bytes(self, payload: bytes) -> tuple[int, int]:
        offset = self._align()
        self.data.extend(payload)
        return offset, len(payload)


def write_packed(model: IntegerModel, folder) -> Path:
    """Write ``model`` into ``folder`` (created if needed); returns the manifest's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights, tables = _Blob(), _Blob()
    weight_entries = []
    for name in sorted(model.weights):
        w = model.weights[name]
        offset, nbytes = weights.add_bytes(pack_bits(w.values, w.bits))
        weight_entries.append({"name": name, "bits": w.bits, "shape": list(w.values.shape), "offset": offset,
                               "nbytes": nbytes, "step": tables.add_array(w.step.astype(np.float32))})
    table_entries = {
        str(r): {op: {key: tables.add_array(arr) for key, arr in sorted(entries.items())}
                 for op, entries in sorted(per_op.items())}
        for r, per_op in sorted(model.tables.items())
    }
    meta = dict(model.meta)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.model,
        "num_classes": model.num_classes,
        "in_chans": model.in_chans,
        "resolutions": list(model.resolutions),
        "input": {"tensor": model.input, "layout": "NCHW", **meta.pop("input", {}),
                  "quantize": "q = clamp(round_half_even(float32(x) / float32(scales[r][first op output])), lo, hi)"},
        "output": {"tensor": model.output, "layout": "NC", "dequantize": "logit = q * scales[r][output tensor]"},
        "tensors": [asdict(model.tensors[k]) for k in model.tensors],
        "ops": [{"kind": op.kind, "name": op.name, "inputs": list(op.inputs), "output": op.output, "attrs": op.attrs}
                for op in model.ops],
        "weights": weight_entries,
        "tables": table_entries,
        "scales": {str(r): dict(s) for r, s in sorted(model.scales.items())},
        "meta": meta,
    }
    (folder / WEIGHTS).write_bytes(bytes(weights.data))
    (folder / TABLES).write_bytes(bytes(tables.data))
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    return path
