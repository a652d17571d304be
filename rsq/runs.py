"""Commands on finished checkpoints: re-evaluate, and calibrate a new resolution."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .checkpoint import atomic_save, build_model, checkpoint_config, checkpoint_file, load_checkpoint
from .config import TrainConfig
from .convert import add_resolution, mode_state, nearest_resolution, using_mode
from .data import build_data, dataset_info
from .data.multires import resize_batch
from .distributed import resolve_device
from .distill import BitWidthEnsembles, EnsembleWeights
from .errors import RsqError
from .evaluate import evaluate_modes, format_table
from .results import write_json_atomic
from .train import build_results


def _check_results_target(out) -> Path:
    """``rsq eval --out``: a new file, or an earlier results JSON; never a folder or another file."""
    path = Path(out)
    if path.is_dir():
        raise RsqError(f"--out {path} is a folder; give the path of a .json file")
    if path.exists():
        try:
            kind = json.loads(path.read_text()).get("kind")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            kind = None
        if kind != "rsq-results":
            raise RsqError(f"--out {path} exists and is not an rsq results file; refusing to overwrite it")
    elif not path.parent.is_dir():
        raise RsqError(f"--out {path}: folder {path.parent} does not exist")
    return path


def _check_data_flags(config) -> None:
    if config.data == "imagefolder" and not config.data_dir:
        raise RsqError("--data imagefolder needs --data-dir ROOT (with ROOT/train/CLASS and ROOT/val/CLASS)")


def resume_config(run_dir, settings: dict, recipe: Optional[str], overwrite: bool) -> TrainConfig:
    """`rsq train --resume RUN`: the saved config; any other setting given is a conflict, never applied."""
    run_dir = Path(run_dir)
    if overwrite:
        raise RsqError("--resume continues a run and --overwrite replaces it; pass one of them")
    if run_dir.is_file():
        raise RsqError(f"--resume takes the run folder, not a file: pass --resume {run_dir.parent}")
    if not (run_dir / "checkpoint.pt").is_file():
        raise RsqError(f"--resume {run_dir}: no checkpoint.pt there to resume from")
    out = settings.get("out")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise RsqError(f"--resume continues {run_dir} in place; drop --out {out}")
    config = checkpoint_config(load_checkpoint(run_dir / "checkpoint.pt"))
    given = {k: v for k, v in settings.items() if v is not None and k != "out"}
    if "resolutions" in given:
        given["resolutions"] = sorted(given["resolutions"], reverse=True)
    saved = config.to_dict()
    conflicts = [f"{k}={v!r} (run has {saved[k]!r})" for k, v in given.items() if saved.get(k) != v]
    if conflicts or recipe:
        raise RsqError("--resume continues the saved config; drop "
                       + (", ".join(conflicts) if conflicts else f"the recipe {recipe!r}"))
    return config.replace(out=str(run_dir))


def _ensemble_of(ckpt: dict) -> nn.Module:
    """The trained ensemble weights: one set, or one per bit width of a joint model."""
    bit_widths = checkpoint_config(ckpt).bit_widths
    n = len(ckpt["resolutions"])
    ensemble = BitWidthEnsembles(n, bit_widths) if bit_widths else EnsembleWeights(n)
    ensemble.load_state_dict(ckpt["ensemble"])
    return ensemble


def evaluate_checkpoint(path, data=None, data_dir=None, resolutions=None, test_subset=None, batch_size=None,
                        device=None, out=None) -> dict:
    """`rsq eval`: the per-resolution table of a checkpoint on its test set (or the one given)."""
    target = _check_results_target(out) if out else None  # before any work, so a bad --out costs nothing
    ckpt = load_checkpoint(path)
    return evaluate_model(build_model(ckpt), ckpt, checkpoint_file(path).parent.name, data=data,
                          data_dir=data_dir, resolutions=resolutions, test_subset=test_subset,
                          batch_size=batch_size, device=device, target=target)


def evaluate_model(model: nn.Module, ckpt: dict, run_name: str, data=None, data_dir=None, resolutions=None,
                   test_subset=None, batch_size=None, device=None, target: Optional[Path] = None) -> dict:
    """Evaluate a model built from ``ckpt`` (its device, amp and layout settings) and print the table."""
    saved = checkpoint_config(ckpt)
    given = {"data": data, "data_dir": data_dir, "test_subset": test_subset, "batch_size": batch_size,
             "device": device}
    config = saved.replace(**{k: v for k, v in given.items() if v is not None})  # a copy: the saved one stays
    known = mode_state(model).resolutions
    # Trained resolutions first: the ensemble weights pair with them (calibrated ones come after).
    order = list(ckpt["resolutions"]) + [r for r in known if r not in ckpt["resolutions"]]
    if resolutions:
        unknown = [r for r in resolutions if r not in known]
        if unknown:
            raise RsqError(f"resolution(s) {unknown} unknown to this checkpoint (known: {known}); "
                           f"add them with `rsq calibrate`")
        order = [r for r in order if r in resolutions]
    _check_data_flags(config)
    num_classes, in_chans = dataset_info(config)
    if (num_classes, in_chans) != (ckpt["num_classes"], ckpt["in_chans"]):
        raise RsqError(f"data set {config.data} has {num_classes} classes / {in_chans} channels; the checkpoint "
                       f"expects {ckpt['num_classes']} / {ckpt['in_chans']}")
    device_ = resolve_device(config.device)
    test = build_data(config.replace(resolutions=order), train=False, device=device_).test
    with_ensemble = order[:len(ckpt["resolutions"])] == list(ckpt["resolutions"])
    ensemble = _ensemble_of(ckpt) if with_ensemble else None
    model.to(device_)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    grid = evaluate_modes(model, test, order, ensemble, device_, config.amp, config.channels_last)
    calibrated = {int(r) for r in ckpt.get("calibrated", {})}
    results = build_results(config, model, grid, ensemble, in_chans, num_classes, run_name,
                            ckpt.get("train_time_s", 0.0), ckpt["resolutions"], calibrated)
    print(format_table(results["rows"], results["ensemble"], results.get("ensembles")))
    if target is not None:
        try:
            write_json_atomic(results, target)
        except OSError as exc:
            raise RsqError(f"cannot write {target}: {exc.strerror or exc}") from None
    return results


@torch.no_grad()
def recalibrate_bn(model: nn.Module, resolution: int, images: torch.Tensor) -> None:
    """Re-estimate one resolution's BN statistics (cumulative average, no weight change), at
    every bit width of a joint model."""
    for bits in mode_state(model).bit_widths or [None]:
        _recalibrate_mode(model, resolution, bits, images)


def _recalibrate_mode(model: nn.Module, resolution: int, bits, images: torch.Tensor) -> None:
    key = mode_state(model).find(resolution, bits).key
    model.eval()
    bns = [m.bns[key] for m in model.modules() if hasattr(m, "bns")]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # an exact average over all calibration batches
        bn.train()
    with using_mode(model, resolution, bits):
        for start in range(0, len(images), 128):
            model(resize_batch(images[start:start + 128], resolution))
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        bn.eval()


def calibrate_checkpoint(path, resolutions: list[int], images: int = 512, like: Optional[int] = None,
                         out=None, test_subset=None, device=None) -> dict:
    """`rsq calibrate`: add BN sets for new resolutions, save atomically, evaluate the calibrated model."""
    source = checkpoint_file(path)
    target = source
    if out:
        # A new file (or a folder, which gets checkpoint.pt): calibrate never replaces another checkpoint.
        target = Path(out) / "checkpoint.pt" if Path(out).is_dir() else Path(out)
        if target.exists() and target.resolve() != source.resolve():
            raise RsqError(f"--out {target} already exists; give a new path, or leave out --out to update "
                           f"{source} in place")
        if not target.parent.is_dir():
            raise RsqError(f"--out {target}: folder {target.parent} does not exist")
    ckpt = load_checkpoint(source)
    config = checkpoint_config(ckpt)
    if images < 1:
        raise RsqError("--images must be at least 1")
    if device is not None:
        config = config.replace(device=device)
    _check_data_flags(config)
    model = build_model(ckpt)
    known = mode_state(model).resolutions
    if like is not None and like not in known:
        raise RsqError(f"--like {like} is not a resolution of this checkpoint (known: {known})")
    device_ = resolve_device(config.device)
    model.to(device_)
    pool = training_pool(config, images, test_subset).to(device_)
    calibrated = dict(ckpt.get("calibrated", {}))
    for r in resolutions:
        # The source BN is only the starting point (its affine part); the statistics are new.
        # Sources come from the resolutions known before this call, and are recorded as used.
        source_resolution = like if like is not None else nearest_resolution(known, r)
        add_resolution(model, r, like=source_resolution)
        recalibrate_bn(model, r, pool)
        calibrated[str(r)] = source_resolution
    ckpt["model"], ckpt["calibrated"] = model.state_dict(), calibrated
    atomic_save(ckpt, target)
    print(f"added resolution(s) {resolutions} to {target} (statistics from {len(pool)} training images)")
    return evaluate_model(model, ckpt, target.parent.name, test_subset=test_subset, device=config.device)


def training_pool(config, images: int, test_subset: Optional[int] = None) -> torch.Tensor:
    """``images`` training images at the largest trained resolution, with the training augmentation:
    what `rsq calibrate` re-estimates BN statistics from (also used by tools/bench_calibrate.py)."""
    calib = build_data(config.replace(subset=images, batch_size=min(images, 128),
                                      test_subset=test_subset or config.test_subset))
    return torch.cat([x for x, _ in _take(calib.train, images)])[:images]


def _take(train_data, images: int):
    count = 0
    epoch = 0
    while count < images:
        for x, y in train_data.batches(epoch):
            yield x, y
            count += len(x)
            if count >= images:
                return
        epoch += 1
