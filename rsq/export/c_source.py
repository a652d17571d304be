"""C writer: an IntegerModel as constant C data for rsq's C runtime (``rsq export --format c``).

The folder it writes builds with any C99 compiler and runs with no library but libm:

- ``rsq_model.c`` / ``rsq_model.h`` (generated): the layer graph, every layer's integer weights
  bit-packed at their own bit width (2-bit weights take a quarter of a byte each; one copy for every
  resolution), and per resolution the requantization tables, each tensor's height and width and its
  byte offset in one arena the caller provides (planned here: tensors whose lifetimes do not overlap
  share bytes);
- ``rsq_runtime.c`` / ``rsq_runtime.h`` (the same for every model) and ``rsq_run.c`` (a command-line
  driver); ``memory.json``: flash and arena bytes per resolution.

The runtime computes the IntegerModel's arithmetic exactly, so its logits equal rsq.runtime's
(`rsq verify` compiles and checks them). Narrow tensors take one byte per value in the arena, wide
ones (the residual stream) four.
"""
from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np

from ..runtime.model import OP_KINDS, IntegerModel
from ..runtime.packed import pack_bits, packed_size

RUNTIME_FILES = ("rsq_runtime.h", "rsq_runtime.c", "rsq_run.c")
MODEL_SOURCE, MODEL_HEADER, MEMORY_FILE = "rsq_model.c", "rsq_model.h", "memory.json"
MODEL_SYMBOL = "rsq_exported_model"
ALIGN = 8  # every tensor starts at a multiple of 8 bytes in the arena
# A conv unpacks this many output channels' weights at a time into int16 scratch, and runs every output
# pixel against them: the scratch is 16 rows (18 KB for a 64-channel 3x3 conv), not the layer, and it stays
# in cache while the pixels stream by.
OC_BLOCK = 16
PIXEL_BLOCK = 4  # RSQ_PIXEL_BLOCK in rsq_runtime.h: a conv gathers four output pixels' receptive fields at once
# Element types, as rsq_runtime.h numbers them.
F32, I8, U8, I32 = range(4)


def element_type(info) -> int:
    if info.kind == "float":
        return F32
    if info.kind == "narrow":
        return I8 if info.signed else U8
    return I32


def tensor_shapes(model: IntegerModel) -> dict[int, dict[str, tuple[int, int]]]:
    """(height, width) of every integer tensor at every resolution, from one zero image through rsq.runtime."""
    from ..runtime import Runtime
    runtime = Runtime(model, gemm="float")
    shapes = {}
    for r in model.resolutions:
        values = runtime.run_all(np.zeros((1, model.in_chans, r, r), np.float32), r)
        shapes[r] = {name: (v.shape[1], v.shape[2]) if v.ndim == 4 else (1, 1) for name, v in values.items()}
        shapes[r][model.input] = (r, r)
    return shapes


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _tensor_bytes(model: IntegerModel, shapes: dict[str, tuple[int, int]], name: str) -> int:
    h, w = shapes[name]
    return h * w * model.tensors[name].channels * (4 if element_type(model.tensors[name]) == I32 else 1)


def plan_arena(model: IntegerModel, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Byte offset of every integer tensor in the arena: largest first, each at the lowest offset that no
    tensor alive at the same time occupies (a tensor lives from the op that writes it to its last reader)."""
    ops = model.ops
    born = {op.output: i for i, op in enumerate(ops)}
    dies = dict(born)
    for i, op in enumerate(ops):
        for name in op.inputs:
            if name in dies:
                dies[name] = max(dies[name], i)
    dies[model.output] = len(ops)  # read back after the last op
    size = {name: _align(_tensor_bytes(model, shapes, name)) for name in born}
    offsets: dict[str, int] = {}
    for name in sorted(born, key=lambda n: (-size[n], born[n])):
        busy = sorted((offsets[o], offsets[o] + size[o]) for o in offsets
                      if born[o] <= dies[name] and born[name] <= dies[o])
        at = 0
        for start, end in busy:
            if at + size[name] <= start:
                break
            at = max(at, end)
        offsets[name] = at
    return offsets


def activation_bytes(model: IntegerModel, shapes: dict[str, tuple[int, int]], offsets: dict[str, int]) -> int:
    """The arena's activation part: the end of the last byte any tensor uses."""
    return max((offsets[n] + _tensor_bytes(model, shapes, n) for n in offsets), default=0)


def pixel_table(model: IntegerModel, resolution: int):
    """[in_chans, 256] int16: the quantized input of every 8-bit pixel value per channel at ``resolution``, or
    None without a recorded normalisation. The same float32 arithmetic as rsq's data pipeline (pixel / 255,
    minus mean, over std) and rsq.runtime's input quantization, so a pixel's entry equals what rsq.runtime
    makes of the normalised pixel."""
    normalisation = model.meta.get("input", {})
    if "mean" not in normalisation or "std" not in normalisation:
        return None
    from ..runtime.execute import quantize_input
    mean = np.asarray(normalisation["mean"], np.float32).reshape(-1, 1)
    std = np.asarray(normalisation["std"], np.float32).reshape(-1, 1)
    if mean.shape[0] != model.in_chans:
        mean, std = np.broadcast_to(mean, (model.in_chans, 1)), np.broadcast_to(std, (model.in_chans, 1))
    x = (np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0) - mean) / std  # [C, 256]
    return quantize_input(model, x[None, :, :, None], resolution)[0, :, :, 0].astype(np.int16)


def _layer_geometry(op) -> tuple[int, int, int, int, int, int, int]:
    """(kh, kw, sh, sw, ph, pw, groups) of a conv or max pooling; a linear is a 1x1 conv on a 1x1 input."""
    if op.kind == "conv":
        a = op.attrs
        return (*a["kernel"], *a["stride"], *a["padding"], a["groups"])
    if op.kind == "max_pool":
        a = op.attrs
        return (*a["kernel"], *a["stride"], *a["padding"], 1)
    return (1, 1, 1, 1, 0, 0, 1)


def _scratch_bytes(model: IntegerModel) -> int:
    """int16 scratch for a conv: OC_BLOCK rows of its weights unpacked and PIXEL_BLOCK receptive fields."""
    largest = 0
    for op in model.ops:
        if op.kind in ("conv", "linear"):
            values = model.weights[op.attrs["weight"]].values
            row = int(np.prod(values.shape[1:]))  # in / groups * kh * kw: one group's receptive field
            largest = max(largest, 2 * (OC_BLOCK + PIXEL_BLOCK) * row)
    return _align(largest)


class _Source:
    """C text: named constant arrays (identical ones written once) and the definitions that use them."""

    def __init__(self):
        self.lines: list[str] = []
        self.arrays: dict[tuple, str] = {}

    def array(self, ctype: str, values, hint: str) -> str:
        values = [int(v) for v in np.asarray(values).reshape(-1)]
        key = (ctype, tuple(values))
        if key not in self.arrays:
            name = f"{hint}_{len(self.arrays)}"
            self.arrays[key] = name
            body = ",\n".join(", ".join(str(v) for v in values[i:i + 24]) for i in range(0, len(values), 24))
            self.lines.append(f"static const {ctype} {name}[{max(len(values), 1)}] = {{\n{body or '0'}\n}};")
        return self.arrays[key]


def write_c(model: IntegerModel, folder) -> Path:
    """Write the C export of ``model`` into ``folder``; returns the path of rsq_model.c."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    package = resources.files("rsq.runtime") / "c"
    for name in RUNTIME_FILES:
        with resources.as_file(package / name) as path:
            shutil.copyfile(path, folder / name)
    tensors = list(model.tensors)
    index = {name: i for i, name in enumerate(tensors)}
    weights = sorted(model.weights)
    shapes = tensor_shapes(model)
    scratch = _scratch_bytes(model)
    src = _Source()
    weight_rows = [_weight_row(src, name, model.weights[name]) for name in weights]
    op_rows = [_op_row(model, op, index, weights) for op in model.ops]
    memory, mode_rows = {}, []
    for r in model.resolutions:
        offsets = plan_arena(model, shapes[r])
        activations = activation_bytes(model, shapes[r], offsets)
        scratch_at = _align(activations)
        memory[r] = {"arena_bytes": scratch_at + scratch, "activation_bytes": activations, "scratch_bytes": scratch}
        mode_rows.append(_mode_row(src, model, r, tensors, shapes[r], offsets, scratch_at, scratch))
    types = ", ".join(f"{{{model.tensors[n].channels}, {element_type(model.tensors[n])}}}" for n in tensors)
    weight_bytes = sum(packed_size(model.weights[n].values.size, model.weights[n].bits) for n in weights)
    resolutions = "/".join(map(str, model.resolutions))
    (folder / MODEL_SOURCE).write_text("\n".join([
        f"/* Generated by rsq (`rsq export --format c`): {model.model}, resolutions {resolutions}. "
        f"Tensors: {', '.join(tensors)}. */",
        f'#include "{MODEL_HEADER}"', "", *src.lines, "",
        f"static const rsq_tensor tensors[{len(tensors)}] = {{{types}}};",
        f"static const rsq_weight weights[{max(len(weights), 1)}] = {{\n" + "\n".join(weight_rows) + "\n};",
        f"static const rsq_op ops[{len(model.ops)}] = {{\n" + "\n".join(op_rows) + "\n};",
        f"static const rsq_mode modes[{len(model.resolutions)}] = {{\n" + "\n".join(mode_rows) + "\n};", "",
        f"const rsq_model {MODEL_SYMBOL} = {{{json.dumps(model.model)}, {model.num_classes}, {model.in_chans}, "
        f"{len(model.ops)}, {len(tensors)}, {len(weights)}, {len(model.resolutions)}, {index[model.input]}, "
        f"{index[model.output]}, ops, tensors, weights, modes, {OC_BLOCK}}};",
        "", f"const rsq_model *rsq_exported(void) {{ return &{MODEL_SYMBOL}; }}", ""]))
    largest = max(m["arena_bytes"] for m in memory.values())
    (folder / MODEL_HEADER).write_text("\n".join([
        f"/* Generated by rsq: {model.model} at {resolutions} px; weights {weight_bytes} bytes bit-packed, shared "
        "by every resolution. */",
        "#ifndef RSQ_MODEL_H", "#define RSQ_MODEL_H", "", '#include "rsq_runtime.h"', "",
        f"#define RSQ_NUM_CLASSES {model.num_classes}", f"#define RSQ_IN_CHANS {model.in_chans}",
        f"#define RSQ_NUM_RESOLUTIONS {len(model.resolutions)}", f"#define RSQ_MAX_ARENA_BYTES {largest}",
        *(f"#define RSQ_ARENA_BYTES_R{r} {m['arena_bytes']}" for r, m in memory.items()),
        f"#define RSQ_MODEL {MODEL_SYMBOL}", "",
        f"extern const rsq_model {MODEL_SYMBOL};", "const rsq_model *rsq_exported(void);", "", "#endif", ""]))
    (folder / MEMORY_FILE).write_text(json.dumps({
        "weight_bytes": weight_bytes,
        "resolutions": {str(r): m for r, m in memory.items()}}, indent=1) + "\n")
    return folder / MODEL_SOURCE


def _weight_row(src: _Source, name: str, w) -> str:
    """A layer's rsq_weight: rows [out][kh][kw][in / groups] (the order the conv reads), bit-packed, one spare byte."""
    values = w.values if w.values.ndim == 4 else w.values[:, :, None, None]
    rows = np.ascontiguousarray(values.transpose(0, 2, 3, 1))
    data = src.array("uint8_t", np.frombuffer(pack_bits(rows, w.bits) + b"\0", np.uint8), "weights")
    return f"    {{{data}, {w.bits}, {rows.shape[0]}, {rows.shape[3]}, {rows.shape[1]}, {rows.shape[2]}}}, /* {name} */"


def _op_row(model: IntegerModel, op, index: dict[str, int], weights: list[str]) -> str:
    ins = [index[n] for n in op.inputs] + [-1]
    weight = weights.index(op.attrs["weight"]) if "weight" in op.attrs else -1
    geometry = ", ".join(str(int(v)) for v in _layer_geometry(op))
    return (f"    {{{OP_KINDS.index(op.kind)}, {ins[0]}, {ins[1]}, {index[op.output]}, {weight}, {geometry}}}, "
            f"/* {op.kind} {op.name} */")


def _mode_row(src: _Source, model: IntegerModel, r: int, tensors: list[str], shapes, offsets, scratch_at: int,
              scratch: int) -> str:
    """Resolution r's rsq_mode (its tables, tensor sizes and arena offsets written into ``src`` first)."""
    table_rows = []
    for op in model.ops:
        t = model.tables[r][op.name]

        def arr(key):
            return src.array("int32_t", t[key], f"r{r}") if key in t else "0"

        a = "_a" if op.kind == "add" else ""  # an add's first multiplier is the table's m0 / shift
        scalar = {k: int(t[k][0]) if k in t else 0 for k in ("bias_shift", "lo", "hi")}
        table_rows.append(f"    {{{arr('bias')}, {arr('m0' + a)}, {arr('shift' + a)}, {arr('m0_b')}, {arr('shift_b')}, "
                          f"{scalar['bias_shift']}, {scalar['lo']}, {scalar['hi']}}},")
    src.lines.append(f"static const rsq_table tables_r{r}[{len(model.ops)}] = {{\n" + "\n".join(table_rows) + "\n};")
    heights = src.array("int32_t", [shapes[n][0] for n in tensors], f"height_r{r}")
    widths = src.array("int32_t", [shapes[n][1] for n in tensors], f"width_r{r}")
    places = src.array("int32_t", [offsets.get(n, -1) for n in tensors], f"offset_r{r}")
    first = next(op for op in model.ops if op.kind == "quantize_input")
    input_scale = float(np.float32(model.scales[r][first.output]))
    pixels = pixel_table(model, r)
    lut = "0" if pixels is None else src.array("int16_t", pixels, f"pixels_r{r}")
    return (f"    {{{r}, (float){input_scale.hex()}, {float(model.scales[r][model.output]).hex()}, {lut}, "
            f"tables_r{r}, {heights}, {widths}, {places}, {scratch_at + scratch}, {scratch_at}}},")
