"""The ``rsq`` command: train, eval, calibrate, report, compare, fetch-data."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

from .config import VALID_BITS
from .errors import RsqError

TRAIN_FLAGS = {  # flag -> (config field, type, help)
    "--model": ("model", str, "model name (see `rsq models`)"),
    "--data": ("data", str, "fashion_mnist (default, embedded) or imagefolder"),
    "--data-dir": ("data_dir", str, "data folder (ImageNet layout ROOT/train, ROOT/val for imagefolder)"),
    "--epochs": ("epochs", int, "training epochs"),
    "--batch-size": ("batch_size", int, "global batch size"),
    "--lr": ("lr", float, "peak learning rate (cosine schedule with warm-up)"),
    "--weight-decay": ("weight_decay", float, "weight decay (never applied to alpha or quantizer steps)"),
    "--warmup-epochs": ("warmup_epochs", float, "linear warm-up length in epochs"),
    "--label-smoothing": ("label_smoothing", float, "label smoothing of the cross-entropies"),
    "--distill": ("distill", str, "MRED variant: full (default), vanilla or none"),
    "--out": ("out", str, "run folder"),
    "--seed": ("seed", int, "random seed (a run with the same seed repeats exactly on the CPU)"),
    "--subset": ("subset", int, "train on N images only (smoke runs)"),
    "--test-subset": ("test_subset", int, "evaluate on N test images only"),
    "--quantizer": ("quantizer", str, "lsq (default) or lqnet"),
    "--first-last": ("first_last", str, "first conv / last FC: 8 (default), fp, same"),
    "--init": ("init", str, "start from this full-precision checkpoint"),
    "--teacher": ("teacher", str, "also distil from this full-precision RS-Net checkpoint"),
    "--device": ("device", str, "auto, cpu or cuda"),
    "--amp": ("amp", str, "auto (bf16 on CUDA), bf16 or off"),
    "--workers": ("workers", int, "DataLoader workers (image folders)"),
    "--checkpoint-every": ("checkpoint_every", int, "also checkpoint every N steps"),
}


def _resolutions(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs at least one resolution, e.g. 224,192,160")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"resolutions must be positive, got {text!r}")
    return values


def _bits(text: str) -> int:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("needs a bit width (2-8, or 32 for full precision)")
    if len(parts) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: one bit width per run (switching bit widths is planned)")
    try:
        value = int(parts[0])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer bit width (2-8, or 32)") from None
    if value not in VALID_BITS:
        raise argparse.ArgumentTypeError(f"{value} bits is not supported; use 2-8, or 32 for full precision")
    return value


MAX_SEED = 2**63 - 1  # what torch.manual_seed and the data generators accept


def _number(kind, minimum=0, exclusive: bool = False, maximum=None):
    """An argparse type: a finite int/float >= minimum (> minimum when exclusive), <= maximum."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if value < minimum or (exclusive and value == minimum):
            rule = f"be greater than {minimum}" if exclusive else ("not be negative" if minimum == 0
                                                                   else f"be at least {minimum}")
            raise argparse.ArgumentTypeError(f"{text!r} must {rule}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at most {maximum}")
        return value
    return parse


def _non_negative(kind):
    return _number(kind, 0)


# Flags whose values have a tighter rule than "not negative".
FLAG_TYPES = {
    "--epochs": _number(int, 1),
    "--batch-size": _number(int, 1),
    "--lr": _number(float, 0, exclusive=True),
    "--seed": _number(int, 0, maximum=MAX_SEED),
    "--label-smoothing": _number(float, 0, maximum=0.999),
}


def add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train an RS-Net (full precision or quantized) with MRED")
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe name in recipes/ or a .toml path (default: fashion_mnist)")
    for flag, (field, kind, text) in TRAIN_FLAGS.items():
        parse = FLAG_TYPES.get(flag) or (_non_negative(kind) if kind in (int, float) else kind)
        p.add_argument(flag, dest=field, type=parse, default=None, help=text)
    p.add_argument("--resolutions", type=_resolutions, default=None, help="comma list, e.g. 224,192,160,128,96")
    p.add_argument("--bits", type=_bits, default=None, help="weight and activation bits: 2-8, or 32 (FP)")
    p.add_argument("--weight-bits", dest="weight_bits", type=_bits, default=None, help="weight bits only")
    p.add_argument("--act-bits", dest="act_bits", type=_bits, default=None, help="activation bits only")
    p.add_argument("--act-per-resolution", dest="act_per_resolution", action="store_const", const=True,
                   default=None, help="one activation quantizer per resolution (default: shared)")
    p.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile, one static graph per resolution")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--resume", metavar="RUN_DIR", default=None, help="continue the run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.set_defaults(func=cmd_train)


def _overrides(args) -> dict:
    values = {field: getattr(args, field) for field, _, _ in TRAIN_FLAGS.values()}
    for field in ("resolutions", "weight_bits", "act_bits", "act_per_resolution", "compile", "channels_last"):
        values[field] = getattr(args, field)
    if args.bits is not None:
        values["weight_bits"] = values["weight_bits"] or args.bits
        values["act_bits"] = values["act_bits"] or args.bits
    return values


def cmd_train(args) -> int:
    from .checkpoint import checkpoint_config, load_checkpoint
    from .config import build_config
    from .train import train

    overrides = _overrides(args)
    if args.resume:
        run_dir = Path(args.resume)
        if args.overwrite:
            raise RsqError("--resume continues a run and --overwrite replaces it; pass one of them")
        if run_dir.is_file():
            raise RsqError(f"--resume takes the run folder, not a file: pass --resume {run_dir.parent}")
        if not (run_dir / "checkpoint.pt").is_file():
            raise RsqError(f"--resume {run_dir}: no checkpoint.pt there to resume from")
        if args.out is not None and Path(args.out).resolve() != run_dir.resolve():
            raise RsqError(f"--resume continues {run_dir} in place; drop --out {args.out}")
        config = checkpoint_config(load_checkpoint(run_dir / "checkpoint.pt"))
        saved = config.to_dict()
        if saved.get("resolutions") is not None:
            saved["resolutions"] = sorted(saved["resolutions"], reverse=True)
        if overrides.get("resolutions") is not None:
            overrides["resolutions"] = sorted(overrides["resolutions"], reverse=True)
        conflicts = [f"{k}={v!r} (run has {saved[k]!r})" for k, v in overrides.items()
                     if v is not None and k != "out" and saved.get(k) != v]
        if conflicts or args.recipe:
            raise RsqError("--resume continues the saved config; drop "
                           + (", ".join(conflicts) if conflicts else f"the recipe {args.recipe!r}"))
        config.out = args.resume
    else:
        config = build_config(args.recipe or "fashion_mnist", overrides)
    train(config, resume=bool(args.resume), overwrite=args.overwrite)
    return 0


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a checkpoint and print the per-resolution table")
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data", default=None)
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--resolutions", type=_resolutions, default=None, help="default: all the checkpoint knows")
    p.add_argument("--test-subset", dest="test_subset", type=_non_negative(int), default=None)
    p.add_argument("--batch-size", dest="batch_size", type=_number(int, 1), default=None)
    p.add_argument("--out", default=None, help="also write the results JSON here")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from .runs import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, data=args.data, data_dir=args.data_dir, resolutions=args.resolutions,
                        test_subset=args.test_subset, batch_size=args.batch_size, out=args.out)
    return 0


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser("calibrate", help="add a BN set for a resolution that was not trained")
    p.add_argument("checkpoint", help="checkpoint file or run folder (updated in place, atomically)")
    p.add_argument("--resolution", type=_resolutions, required=True, help="new resolution(s), e.g. 26 or 26,14")
    p.add_argument("--images", type=_number(int, 1), default=512, help="training images for the statistics")
    p.add_argument("--like", type=_number(int, 1), default=None,
                   help="start from this resolution's BN (default: nearest)")
    p.add_argument("--out", default=None, help="write the calibrated checkpoint here instead of in place")
    p.add_argument("--test-subset", dest="test_subset", type=_non_negative(int), default=None)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args) -> int:
    from .runs import calibrate_checkpoint

    calibrate_checkpoint(args.checkpoint, args.resolution, images=args.images, like=args.like, out=args.out,
                         test_subset=args.test_subset)
    return 0


def cmd_fetch_data(args) -> int:
    from .data.fashion_mnist import fetch

    print(f"Fashion-MNIST is in {fetch()}")
    return 0


def cmd_models(args) -> int:
    from .models import list_models

    print("\n".join(list_models()))
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other rsq error, and exits 2.

    Sub-command parsers are made with the parent's class, so this covers all of them.
    """

    def error(self, message: str):
        self.exit(2, f"rsq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rsq", description="Quantization-aware training of resolution-switchable networks.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    try:
        from .report import add_report_commands
    except ImportError:  # report module not installed in this build
        add_report_commands = None
    if add_report_commands is not None:
        add_report_commands(sub)
    sub.add_parser("fetch-data", help="fetch Fashion-MNIST from Debian's package into the cache").set_defaults(
        func=cmd_fetch_data)
    sub.add_parser("models", help="list the model names").set_defaults(func=cmd_models)
    return parser


def _one_line(exc: BaseException) -> str:
    # Errors raised in DataLoader workers come back with the worker's traceback in the message.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else exc.__class__.__name__
    return last.split("RsqError: ", 1)[-1]


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except RsqError as exc:
        # An error every DDP rank agreed on is printed once, by rank 0.
        if not (getattr(exc, "all_ranks", False) and os.environ.get("RANK", "0") != "0"):
            print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rsq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # A worker that failed on a user's file re-raises here under its own type.
        if "RsqError" in str(exc):
            print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
