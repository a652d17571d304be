"""An export folder: export.json, a copy of the checkpoint, one sub-folder per format, each written whole
(into a temporary folder, then renamed) so that a failed export leaves the folder as it was."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from ..errors import RsqError, choices_error

# Written from the IntegerModel (rsq.export.lower): exact ONNX, packed, the fast QLinear ONNX, and C
# source for rsq's C runtime (microcontrollers, or any target with a C compiler).
INTEGER_FORMATS = ("onnx", "packed", "qlinear", "c")
# Written from the fake-quant model by another toolkit's exporter: QONNX (brevitas, for FINN),
# PT2E (torchao, for Inductor on server CPUs), ExecuTorch (.pte with XNNPACK, for phones: int8 convs,
# or "executorch-exact", float convs between rsq's quantizations, which equal the fake-quant model).
ECOSYSTEM_FORMATS = ("qonnx", "pt2e", "executorch", "executorch-exact")
FORMATS = INTEGER_FORMATS + ECOSYSTEM_FORMATS
MARKER = "export.json"
EXPORT_FORMAT = "rsq-export"
EXPORT_VERSION = 1
CHECKPOINT_COPY = "checkpoint.pt"


def read_export_info(folder) -> dict:
    """export.json of an export folder, or an RsqError saying why it is not one."""
    path = Path(folder) / MARKER
    if not path.is_file():
        raise RsqError(f"{folder} is not an rsq export (no {MARKER})")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RsqError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        raise RsqError(f"{path} is not an rsq export marker")
    return info


def export_checkpoint(checkpoint, fmt: str, out, resolutions: Optional[Iterable[int]] = None,
                      overwrite: bool = False, bits: Optional[int] = None, snap: bool = True) -> Path:
    """Export ``checkpoint`` (file or run folder) as ``fmt`` into folder ``out``; returns the format's folder.

    ``bits``: for a checkpoint that switches bit widths, the one to export (its weights on that
    grid, its modes' tables); a checkpoint of one bit width takes None (or its own).
    ``snap``: move the BN shifts so each narrow conv's bias sits on the int8 kernels' grid (rsq.export.snap);
    the export's checkpoint.pt is the model so exported, the fake-quant model every format is verified against.

    A second format of the same checkpoint and resolutions is added to an existing export; any
    other existing export is refused unless ``overwrite``. Nothing is left behind on failure: the
    new files are built in a temporary folder beside their destination and renamed into place.
    """
    if fmt not in FORMATS:
        raise choices_error("export format", fmt, FORMATS)
    if fmt in ("onnx", "qlinear"):
        from .onnx import require_onnx
        require_onnx()
    out = Path(out)
    existing = _existing_export(out)
    from ..checkpoint import checkpoint_file
    source = checkpoint_file(checkpoint)
    digest = _sha256(source)
    same_checkpoint = (existing is not None and existing.get("checkpoint_sha256") == digest
                       and existing.get("bits") == bits)
    if existing is not None and not overwrite:
        if not same_checkpoint:
            raise RsqError(f"{out} already holds an export of another checkpoint; pass overwrite=True "
                           f"(--overwrite) to replace it")
        if fmt in existing.get("formats", {}):
            raise RsqError(f"{out} already holds a {fmt} export; pass overwrite=True (--overwrite) to replace it")
    model, ckpt, config = _load(source, bits)
    taken, feature = _formats_taking(config)
    if fmt not in taken:
        raise RsqError(f"the {fmt} format does not take {feature}; export it as {', '.join(taken)}")
    same_snap = existing is None or existing.get("bias_snap", {}).get("snapped", False) == snap
    if same_checkpoint and not same_snap and not overwrite:
        raise RsqError(f"{out} holds an export {'without' if snap else 'with'} snapped biases; add this format the "
                       f"same way ({'--no-snap' if snap else 'without --no-snap'}), or pass --overwrite")
    snapped = _snap(model, config, bits) if snap else {"snapped": False, "convs": 0, "largest_move": 0.0}
    if fmt in INTEGER_FORMATS:
        job = _Job(model, ckpt, lower_checkpoint_model(model, config, resolutions, bits), bits)
        chosen, entry_digest = list(job.integer_model.resolutions), job.integer_model.digest()
    else:
        chosen, entry_digest = _chosen_resolutions(model, resolutions), digest
        job = _Job(model, ckpt, None, bits, chosen)
    entry = {"resolutions": chosen, "digest": entry_digest}
    # One folder, one checkpoint and one set of resolutions: a second format joins the first.
    joins = same_checkpoint and same_snap and existing.get("resolutions") == chosen
    if existing is not None and not joins and not overwrite:
        raise RsqError(f"{out} holds an export at resolutions {existing.get('resolutions')}, not "
                       f"{chosen}; pass overwrite=True (--overwrite) to replace it")
    if joins:
        info = dict(existing)
        info["formats"] = {**existing.get("formats", {}), fmt: entry}
        _replace_format(out, fmt, job, info)
    else:
        info = _new_info(ckpt, config, source, digest, chosen, bits)
        info["formats"] = {fmt: entry}
        info["bias_snap"] = snapped
        _replace_whole(out, lambda tmp: _fill_new(tmp, fmt, job, info))
    return out / fmt


def formats_for(checkpoint) -> tuple[list[str], str]:
    """The formats ``rsq export --format all`` writes for ``checkpoint``, and why the others are left out ("" when
    none is): a residual stream on learned grids (residual_bits) goes to the IntegerModel's formats only."""
    from ..checkpoint import checkpoint_config, checkpoint_file, load_checkpoint
    taken, feature = _formats_taking(checkpoint_config(load_checkpoint(checkpoint_file(checkpoint))))
    left_out = [fmt for fmt in FORMATS if fmt not in taken]
    return taken, f"{', '.join(left_out)} left out: they do not take {feature}" if left_out else ""


def _formats_taking(config) -> tuple[list[str], str]:
    """The formats that can carry a checkpoint of ``config``, and the feature of it the others cannot ("" when
    every format can)."""
    if config.residual_bits != 32:
        return list(INTEGER_FORMATS), f"a residual stream on learned grids (residual_bits {config.residual_bits})"
    return list(FORMATS), ""


class _Job:
    """What a writer needs: the IntegerModel for the integer formats, the model for the others."""

    def __init__(self, model, ckpt, integer_model, bits, resolutions=None):
        self.model, self.ckpt, self.integer_model, self.bits = model, ckpt, integer_model, bits
        self.resolutions = resolutions or list(integer_model.resolutions)


def _chosen_resolutions(model, resolutions) -> list[int]:
    from ..convert import mode_state
    known = mode_state(model).resolutions
    chosen = known if resolutions is None else sorted({int(r) for r in resolutions}, reverse=True)
    unknown = [r for r in chosen if r not in known]
    if unknown or not chosen:
        raise RsqError(f"resolution(s) {unknown or chosen} unknown to this model (known: "
                       f"{', '.join(str(r) for r in known)})")
    return chosen


# ---- inputs ----

def _existing_export(out: Path) -> Optional[dict]:
    if out.exists() and not out.is_dir():
        raise RsqError(f"export target {out} is a file, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return None
    if not (out / MARKER).is_file():
        raise RsqError(f"export target {out} is a non-empty folder that is not an rsq export; choose another --out")
    return read_export_info(out)


def _load(source: Path, bits: Optional[int] = None):
    from ..checkpoint import checkpoint_config, load_model
    model, ckpt = load_model(source)  # missing / truncated / foreign checkpoints: its RsqErrors
    config = checkpoint_config(ckpt)
    _check_bits(source, config, bits)
    if not config.quantized:
        raise RsqError(f"{source} is a full-precision checkpoint; integer export needs a quantized one "
                       f"(train with --bits 2-8)")
    if config.quantizer != "lsq":
        raise RsqError(f"{source} uses the {config.quantizer} quantizer (non-uniform levels); integer export needs lsq")
    return model, ckpt, config


def _check_bits(source: Path, config, bits: Optional[int]) -> None:
    if config.bit_widths:
        quantized = [b for b in config.bit_widths if b != 32]
        if bits is None or bits not in quantized:
            given = "" if bits is None else f" ({bits} is not one of them)"
            raise RsqError(f"{source} switches between bit widths {', '.join(map(str, config.bit_widths))}; pick the "
                           f"one to export with --bits {'|'.join(map(str, quantized))}{given}")
    elif bits is not None and bits != config.weight_bits:
        raise RsqError(f"{source} is a one-bit-width checkpoint (W{config.weight_bits}A{config.act_bits}); "
                       f"drop --bits {bits}")


def lower_checkpoint_model(model, config, resolutions=None, bits: Optional[int] = None):
    """The IntegerModel that export_checkpoint writes for a checkpoint's model and config
    (at ``bits`` for a checkpoint that switches bit widths)."""
    from .lower import lower as _lower
    chosen = None if resolutions is None else [int(r) for r in resolutions]
    with _at_bits(model, config, bits):
        integer_model = _lower(model, chosen)
    integer_model.meta["input"] = _input_description(config)
    return integer_model


def _at_bits(model, config, bits: Optional[int]):
    """A checkpoint that switches bit widths at ``bits`` (any resolution: the lowering visits each); else nothing."""
    from ..convert import mode_state, using_mode
    return using_mode(model, mode_state(model).resolutions[0], bits) if config.bit_widths else contextlib.nullcontext()


def _snap(model, config, bits: Optional[int]) -> dict:
    """rsq.export.snap on the model to export, in place: its conv biases onto the int8 kernels' grid, so that the
    export's fake-quant model, rsq.runtime and the int8 graphs agree. A model the lowering refuses is left as it
    is (its integer formats give the error)."""
    from .snap import snap_biases
    try:
        with _at_bits(model, config, bits):
            return {"snapped": True, **snap_biases(model)}
    except RsqError:
        return {"snapped": True, "convs": 0, "largest_move": 0.0}


def _input_description(config) -> dict:
    """How the exported graph's float input is made from 8-bit pixels (the data set's normalisation)."""
    from ..data import input_normalization
    mean, std = input_normalization(config)
    return {"mean": list(mean), "std": list(std),
            "preprocess": "x = (pixel / 255 - mean) / std per channel, resized (bilinear, antialiased) to r x r"}


def _new_info(ckpt, config, source: Path, digest: str, resolutions, bits: Optional[int] = None) -> dict:
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": config.model, "bits": bits,
            "weight_bits": bits or config.weight_bits, "act_bits": bits or config.act_bits,
            "first_last": config.first_last,
            "checkpoint": CHECKPOINT_COPY, "checkpoint_source": str(source), "checkpoint_sha256": digest,
            "data": config.data, "resolutions": list(resolutions)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- writing, atomically ----

def _write_format(fmt: str, job: _Job, folder: Path) -> None:
    if fmt == "onnx":
        from .onnx import write_onnx
        write_onnx(job.integer_model, folder)
    elif fmt == "packed":
        from .packed import write_packed
        write_packed(job.integer_model, folder)
    elif fmt == "c":
        from .c_source import write_c
        write_c(job.integer_model, folder)
    elif fmt == "qlinear":
        from .qlinear import calibrate, write_qlinear
        write_qlinear(job.integer_model, *calibrate(job.integer_model, _calibration_images(job)), folder)
    else:
        _write_ecosystem(fmt, job, folder)


def _calibration_images(job: _Job, purpose: str = "the qlinear format calibrates its 8-bit grids") -> dict:
    """Training images (the run's own data and augmentation) at every exported resolution, as numpy NCHW:
    what the QLinear format calibrates its 8-bit residual grids and its requantization fits on (and the int8
    ExecuTorch program its fits)."""
    from ..checkpoint import checkpoint_config
    from ..data import resize_batch
    from ..runs import training_pool
    from .qlinear import CALIBRATION_IMAGES
    try:
        pool = training_pool(checkpoint_config(job.ckpt).replace(device="cpu"), CALIBRATION_IMAGES)
    except RsqError as exc:
        raise RsqError(f"{purpose} on the run's training images: {exc}") from None
    return {r: resize_batch(pool, r).numpy() for r in job.resolutions}


def _executorch_images(fmt: str, job: _Job):
    """The calibration images of the int8 program's requantization fits, when the run's training images are at
    hand; without them the program is still written, with XNNPACK's own rounding where no exact fit exists,
    and one line says so."""
    if fmt != "executorch":
        return None
    try:
        return _calibration_images(job, "executorch fits its requantization")
    except RsqError as exc:
        print(f"note: {exc}; written without: convs with no exact fit keep XNNPACK's rounding", file=sys.stderr)
        return None


def _write_ecosystem(fmt: str, job: _Job, folder: Path) -> None:
    """QONNX and PT2E: one file per resolution; ExecuTorch: one .pte, a method per resolution."""
    from ..convert import mode_state, using_mode
    folder.mkdir(parents=True)
    model, in_chans = job.model, job.ckpt["in_chans"]
    # A joint model runs at the chosen bit width (the writers pin each resolution themselves).
    with using_mode(model, mode_state(model).resolutions[0], job.bits):
        if fmt in ("executorch", "executorch-exact"):
            from .executorch import write_executorch
            write_executorch(model, job.resolutions, in_chans, folder / EXECUTORCH_FILE,
                             int8_gemms=fmt == "executorch", calibration=_executorch_images(fmt, job))
            return
        for r in job.resolutions:
            if fmt == "qonnx":
                from ..interop.brevitas import write_qonnx
                write_qonnx(model, r, in_chans, folder / qonnx_file(r))
            else:
                from .pt2e import write_pt2e
                write_pt2e(model, r, in_chans, folder / pt2e_file(r))


EXECUTORCH_FILE = "model.pte"


def qonnx_file(resolution: int) -> str:
    """One QONNX graph per resolution (FINN builds one accelerator per graph)."""
    return f"model_r{resolution}.onnx"


def pt2e_file(resolution: int) -> str:
    return f"model_r{resolution}.pt2"


def _write_info(info: dict, folder: Path) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


def _fill_new(tmp: Path, fmt: str, job: _Job, info: dict) -> None:
    import torch
    # The model as exported (its biases snapped): what rsq verify compares every format with.
    torch.save({**job.ckpt, "model": job.model.state_dict()}, tmp / CHECKPOINT_COPY)
    _write_format(fmt, job, tmp / fmt)
    _write_info(info, tmp)


def _replace_whole(out: Path, fill) -> None:
    """Build a new export folder beside ``out`` and swap it in (the old one, if any, goes last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is an ordinary folder
        fill(tmp)
        _swap(tmp, out)
    except OSError as exc:
        raise RsqError(f"cannot write export {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_format(out: Path, fmt: str, job: _Job, info: dict) -> None:
    """Add (or replace) one format's sub-folder of an existing export, then update its marker."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{fmt}.", suffix=".tmp", dir=out))
    try:
        _write_format(fmt, job, tmp / fmt)
        _swap(tmp / fmt, out / fmt)
        marker_tmp = tmp / MARKER
        _write_info(info, tmp)
        os.replace(marker_tmp, out / MARKER)
    except OSError as exc:
        raise RsqError(f"cannot write export {out}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
