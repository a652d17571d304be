"""The ``rsq`` command (click): train, eval, calibrate, report, compare, export, verify, models, fetch-data.

`rsq train`'s options are made from TrainConfig's schema (rsq/config.py), so a setting, its
type, help text and choices are written once. Every bad input ends the same way: one line
``rsq: error: ...`` on stderr and exit code 2 (click's own usage errors included).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import click

from . import __version__
from .config import Range, TrainConfig, schema
from .errors import RsqError
from .nn.quantizers import VALID_BITS
from .quantize import QuantizationWarning

# ----------------------------------------------------------------------------- value types
# Each type's message is the value and the rule ("'0' must be at least 1"); the error handler
# adds which option it was ("argument --epochs: ...").


class Number(click.ParamType):
    """A finite int or float inside a config Range."""

    def __init__(self, kind: type, rule: Optional[Range] = None):
        self.kind, self.rule = kind, rule or Range()
        self.name = kind.__name__

    def convert(self, value, param, ctx):
        if isinstance(value, self.kind) and not isinstance(value, bool):
            parsed = value
        else:
            try:
                parsed = self.kind(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a valid {self.kind.__name__}", param, ctx)
        problem = self.rule.problem(parsed)
        if problem:
            self.fail(f"{value!r} {problem}", param, ctx)
        return parsed


class IntList(click.ParamType):
    """Comma-separated positive integers: resolutions."""

    name = "list"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        parts = [p.strip() for p in str(value).split(",") if p.strip()]
        if not parts:
            self.fail("needs at least one resolution, e.g. 224,192,160", param, ctx)
        try:
            values = [int(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)
        if any(v <= 0 for v in values):
            self.fail(f"resolutions must be positive, got {value!r}", param, ctx)
        return values


class Bits(click.ParamType):
    """A bit width (2-8, or 32 for full precision), or with ``many`` a comma list of distinct ones."""

    name = "bits"

    def __init__(self, many: bool = False):
        self.many = many

    def convert(self, value, param, ctx):
        if isinstance(value, (int, list)):
            return value
        parts = [p.strip() for p in str(value).split(",")]
        if not any(parts):
            self.fail("needs a bit width (2-8, or 32 for full precision)", param, ctx)
        if len(parts) > 1 and not self.many:
            self.fail(f"{value!r}: one bit width here (`--bits` takes a list)", param, ctx)
        try:
            values = [int(p) for p in parts]
        except ValueError:
            self.fail(f"{value!r} is not an integer bit width (2-8, or 32)"
                      + (" or a comma list of them" if self.many else ""), param, ctx)
        for bits in values:
            if bits not in VALID_BITS:
                self.fail(f"{bits} bits is not supported; use 2-8, or 32 for full precision", param, ctx)
        if len(set(values)) != len(values):
            self.fail(f"{value!r} names a bit width twice", param, ctx)
        return values if len(values) > 1 else values[0]


def config_options(command):
    """Add one option per TrainConfig field, from its schema; every default is None (= not given)."""
    defaults = TrainConfig()
    for f in reversed(schema()):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        shown = getattr(defaults, f.name)
        shown = ",".join(map(str, shown)) if isinstance(shown, list) else shown
        text = meta["help"] + (f" [default: {shown}]" if shown not in ("", False) else "")
        if meta["cli"] == "bits":
            continue  # set by --bits (one bit width, or a list: a model that switches between them)
        if meta["cli"] == "flag":
            option = click.option(flag, f.name, is_flag=True, flag_value=True, default=None, help=text)
        elif meta["cli"] == "switch":
            option = click.option(f"{flag}/--no-{flag[2:]}", f.name, default=None, help=text)
        elif meta["choices"]:
            # Checked by TrainConfig, whose message names the setting ("unknown distill mode 'x'").
            option = click.option(flag, f.name, default=None, help=text, metavar=f"[{'|'.join(meta['choices'])}]")
        else:
            kind = (Bits() if meta["bits"] else IntList() if f.type == "list[int]"
                    else Number(int if f.type == "int" else float, meta["range"]) if f.type in ("int", "float")
                    else click.STRING)
            option = click.option(flag, f.name, type=kind, default=None, help=text)
        command = option(command)
    return command


# ----------------------------------------------------------------------------- the group


class RsqGroup(click.Group):
    """click.Group whose every failure is one ``rsq: error:`` line and an exit code."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name is not None and not name.startswith("-") and self.get_command(ctx, name) is None:
            raise click.UsageError(f"unknown command {name!r}; choose from: {', '.join(self.list_commands(ctx))}",
                                   ctx)
        return super().resolve_command(ctx, args)

    def list_commands(self, ctx):
        return list(self.commands)  # the order they are declared in, which is the order of use

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        warnings.showwarning = _show_warning
        try:
            result = super().main(args, prog_name or "rsq", complete_var, standalone_mode=False, **extra)
            code = result if isinstance(result, int) else 0
        except click.UsageError as exc:
            print(f"rsq: error: {_usage_line(exc)}", file=sys.stderr)
            code = 2
        except click.Abort:
            print("rsq: interrupted", file=sys.stderr)
            code = 130
        except RsqError as exc:
            # An error every DDP rank agreed on is printed once, by rank 0.
            if not (getattr(exc, "all_ranks", False) and os.environ.get("RANK", "0") != "0"):
                print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
            code = 2
        except Exception as exc:
            # A DataLoader worker that failed on a user's file re-raises here under its own type.
            if "RsqError" not in str(exc):
                raise
            print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
            code = 2
        if standalone_mode:
            sys.exit(code)
        return code


_python_showwarning = warnings.showwarning


def _show_warning(message, category, *args, **kwargs):
    """rsq's own warnings as one line, like its errors; everybody else's as Python shows them."""
    if issubclass(category, QuantizationWarning):
        print(f"rsq: warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, *args, **kwargs)


def _usage_line(exc: click.UsageError) -> str:
    if isinstance(exc, click.NoSuchOption):
        hint = f" (did you mean {', '.join(sorted(exc.possibilities))}?)" if exc.possibilities else ""
        text = f"unrecognized arguments: {exc.option_name}{hint}"
    elif isinstance(exc, click.BadParameter) and exc.param is not None and not isinstance(exc, click.MissingParameter):
        name = exc.param.opts[0] if exc.param.param_type_name == "option" else exc.param.human_readable_name
        text = f"argument {name}: {exc.message}"
    else:
        text = exc.format_message().rstrip(".")
    where = exc.ctx.command_path if exc.ctx is not None else "rsq"
    return f"{' '.join(text.split())} (see `{where} --help`)"


def _one_line(exc: BaseException) -> str:
    # Errors raised in DataLoader workers come back with the worker's traceback in the message.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    last = lines[-1] if lines else exc.__class__.__name__
    return last.split("RsqError: ", 1)[-1]


@click.group(cls=RsqGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="rsq", message="%(prog)s %(version)s")
def cli():
    """Quantization-aware training of resolution-switchable networks (RS-Nets).

    \b
    Examples:
      rsq train                                    # the embedded default: Fashion-MNIST, 5 resolutions
      rsq train fashion_mnist_w4a4 --init runs/fashion_mnist
      rsq eval runs/fashion_mnist
      rsq compare runs/fashion_mnist runs/fashion_mnist_w4a4 --plot cmp.png
    """


# ----------------------------------------------------------------------------- train


@cli.command()
@click.argument("recipe", required=False)
@config_options
@click.option("--bits", type=Bits(many=True), default=None,
              help="weight and activation bits: one of 2-8 or 32 (FP), or a list such as 2,4,8,32 for one model "
                   "that switches between them")
@click.option("--resume", metavar="RUN_DIR", default=None, help="continue the stopped run in RUN_DIR")
@click.option("--overwrite", is_flag=True, help="replace a run already in --out")
def train(recipe, bits, resume, overwrite, **settings):
    """Train an RS-Net (full precision or quantized) with MRED.

    RECIPE is a shipped recipe's name (`rsq recipes`; default: fashion_mnist) or a .toml path;
    options override it. The defaults shown are the fashion_mnist recipe's. The resolved config
    is saved in the run folder as config.toml.

    \b
    Examples:
      rsq train --out runs/fashion_mnist
      rsq train fashion_mnist_w4a4 --init runs/fashion_mnist/checkpoint.pt
      rsq train imagenet_resnet18 --data-dir /data/imagenet --epochs 90
      rsq train --subset 2000 --test-subset 1000 --epochs 1 --out runs/smoke
      rsq train --resume runs/fashion_mnist
    """
    from .runs import resume_config
    from .config import build_config
    from .train import train as run_training

    apply_bits_option(bits, settings, replace_recipe_bits=not resume)
    if resume:
        config = resume_config(resume, settings, recipe, overwrite)
    else:
        config = build_config(recipe or "fashion_mnist", settings)
    run_training(config, resume=bool(resume), overwrite=overwrite)
    return 0


def apply_bits_option(bits, settings: dict, replace_recipe_bits: bool = True) -> None:
    """Put `--bits` (one bit width or a list) into the train settings, in place.

    ``replace_recipe_bits``: `--bits` also replaces the recipe's bits of the other kind (a list the
    recipe's weight_bits/act_bits, one bit width its bit_widths), so `rsq train fashion_mnist_w4a4
    --bits 2,4,8` is a joint model; `--weight-bits`/`--act-bits` given next to a list still conflict,
    with the config's message. Off for --resume, whose conflict message names only what was typed.
    """
    if isinstance(bits, list):
        settings["bit_widths"] = bits
        if replace_recipe_bits:
            settings["weight_bits"] = settings["weight_bits"] or 32
            settings["act_bits"] = settings["act_bits"] or 32
    elif bits is not None:
        if replace_recipe_bits:
            settings["bit_widths"] = []
        settings["weight_bits"] = settings["weight_bits"] or bits
        settings["act_bits"] = settings["act_bits"] or bits


# ----------------------------------------------------------------------------- eval / calibrate

device_option = click.option("--device", default=None, help="auto, cpu or cuda [default: the run's]")


@cli.command(name="eval")
@click.argument("checkpoint")
@click.option("--data", default=None, help="data set [default: the run's]")
@click.option("--data-dir", default=None, help="data folder [default: the run's]")
@click.option("--resolutions", type=IntList(), default=None, help="comma list [default: all the checkpoint knows]")
@click.option("--test-subset", type=Number(int), default=None, help="evaluate on the first N test images")
@click.option("--batch-size", type=Number(int, Range(1)),
              default=None, help="evaluation batch size")
@device_option
@click.option("--out", default=None, help="also write the results JSON here")
def eval_(checkpoint, **options):
    """Re-evaluate a checkpoint (file or run folder) and print the per-resolution table.

    \b
    Examples:
      rsq eval runs/fashion_mnist
      rsq eval runs/fashion_mnist --resolutions 28,20 --out eval.json
    """
    from .runs import evaluate_checkpoint

    evaluate_checkpoint(checkpoint, **options)
    return 0


@cli.command()
@click.argument("checkpoint")
@click.option("--resolution", type=IntList(), required=True, help="new resolution(s), e.g. 26 or 26,14")
@click.option("--images", type=Number(int, Range(1)),
              default=512, show_default=True, help="training images for the BN statistics")
@click.option("--like", type=Number(int, Range(1)),
              default=None, help="start from this resolution's BN [default: the nearest]")
@click.option("--out", default=None, help="write the calibrated checkpoint here instead of in place")
@click.option("--test-subset", type=Number(int), default=None, help="evaluate on the first N test images")
@device_option
def calibrate(checkpoint, resolution, **options):
    """Add a BN set for a resolution that was never trained (the checkpoint is updated atomically).

    \b
    Examples:
      rsq calibrate runs/fashion_mnist --resolution 26
      rsq calibrate runs/fashion_mnist --resolution 26,14 --out calibrated.pt
    """
    from .runs import calibrate_checkpoint

    calibrate_checkpoint(checkpoint, resolution, **options)
    return 0


# ----------------------------------------------------------------------------- report / compare

table_options = [
    click.option("--format", "fmt", default="md", show_default=True, metavar="md|csv|json",
                 help="table format (csv and json keep raw numbers)"),
    click.option("--plot", metavar="FILE.png", default=None, help="also write an accuracy-vs-cost figure"),
    click.option("--out", metavar="FILE", default=None, help="write the table here instead of stdout"),
]


def with_table_options(command):
    for option in reversed(table_options):
        command = option(command)
    return command


@cli.command()
@click.argument("run_dir")
@with_table_options
@click.option("--latency", is_flag=True, help="measure CPU latency per resolution from checkpoint.pt (batch 1)")
@click.option("--repeats", type=Number(int, Range(1)),
              default=30, show_default=True, help="timed forward passes per resolution for --latency")
@click.option("--threads", type=Number(int, Range(1)),
              default=1, show_default=True, help="CPU threads for --latency (1 is stable on shared machines)")
def report(run_dir, fmt, plot, out, latency, repeats, threads):
    """Tabulate a finished run's results.json.

    \b
    Examples:
      rsq report runs/fashion_mnist
      rsq report runs/fashion_mnist --format csv --out table.csv --latency
    """
    _require_pandas("rsq report")
    from .report import report_run

    report_run(run_dir, fmt, plot, out, latency, repeats, threads)
    return 0


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@with_table_options
def compare(run_dirs, fmt, plot, out):
    """Compare finished runs side by side; deltas are against the first.

    \b
    Examples:
      rsq compare runs/fashion_mnist runs/fashion_mnist_w4a4 --plot compare.png
    """
    _require_pandas("rsq compare")
    from .report import compare_runs

    compare_runs(list(run_dirs), fmt, plot, out)
    return 0


def _require_pandas(command: str) -> None:
    from .deps import require

    require("pandas", command)


# ----------------------------------------------------------------------------- export / verify


@cli.command()
@click.argument("checkpoint")
@click.option("--format", "fmt", default="all", show_default=True, metavar="onnx|qlinear|packed|...|all",
              help="what to write: onnx, qlinear, packed, c, qonnx, pt2e, executorch, executorch-exact (see the "
                   "README), or all of them")
@click.option("--out", required=True, help="export folder (written atomically)")
@click.option("--resolution", "--resolutions", "resolutions", type=IntList(), default=None,
              help="resolution(s) to export [default: all the checkpoint knows]")
@click.option("--bits", type=Bits(), default=None,
              help="for a checkpoint that switches bit widths: the one to export")
@click.option("--overwrite", is_flag=True, help="replace an export already in --out")
@click.option("--no-snap", "no_snap", is_flag=True,
              help="export the checkpoint's BatchNorm shifts as they are, not snapped onto the int8 kernels' bias "
                   "grid (docs/export.md §8d); the export's fake-quant model is then the checkpoint's")
def export(checkpoint, fmt, out, resolutions, bits, overwrite, no_snap):
    """Export a quantized checkpoint for edge targets: integer-only ONNX (exact, or on onnxruntime's fast
    8-bit kernels), a bit-packed checkpoint with a numpy reference runtime, C source for rsq's C runtime
    (microcontrollers), QONNX for FINN, PT2E and ExecuTorch (see the README's export section).

    \b
    Examples:
      rsq export runs/fashion_mnist_w4a4 --out exports/w4a4
      rsq export runs/joint --bits 2 --format packed --out exports/joint_w2
      rsq export runs/fashion_mnist_w4a4 --format c --out exports/w4a4_c
    """
    from .export import export_checkpoint, formats_for
    from .quiet import third_party_notes_off

    names, left_out = formats_for(checkpoint) if fmt == "all" else ([fmt], "")
    for name in names:
        with third_party_notes_off():
            written = export_checkpoint(checkpoint, name, out, resolutions, overwrite=overwrite, bits=bits,
                                        snap=not no_snap)
        overwrite = False  # the next format joins this export
        click.echo(f"wrote {written}" + (_c_memory(written) if name == "c" else "")
                   + (QLINEAR_NOTE if name == "qlinear" else ""))
    if left_out:
        click.echo(left_out)
    return 0


# What a user deploying the QLinear graph must know before trusting it as the model (docs/export.md §8a, §8c).
QLINEAR_NOTE = (" (onnxruntime's fused 8-bit kernels: fast, bit-exact only where every conv output is narrow, as "
                "with --residual-bits 8; `rsq verify` measures its agreement, and the onnx, packed and c formats are "
                "the exact ones)")


def _c_memory(folder) -> str:
    """The C export's budget in one phrase: what a microcontroller user sizes a part by."""
    import json

    from .export.c_source import MEMORY_FILE
    memory = json.loads((Path(folder) / MEMORY_FILE).read_text())
    arena = ", ".join(f"{r} px {m['arena_bytes'] / 1024:.0f} KiB" for r, m in memory["resolutions"].items())
    return f" (weights {memory['weight_bytes'] / 1024:.0f} KiB for every resolution; RAM: {arena})"


@cli.command()
@click.argument("export_dir")
@click.option("--test-subset", type=Number(int), default=None, help="verify on the first N test images")
@click.option("--data-dir", default=None, help="data folder [default: the run's]")
@click.option("--out", default=None, help="also write the table as JSON here")
@click.option("--latency/--no-latency", default=True, show_default=True,
              help="time every engine at batch 1 and 32, warm (PT2E compiles once per batch size)")
@click.option("--threads", type=Number(int, Range(1)), default=None,
              help="run every engine on N threads (torch, onnxruntime, XNNPACK) [default: torch's count]")
def verify(export_dir, test_subset, data_dir, out, latency, threads):
    """Run every artifact of an export on the run's test set and compare it with the fake-quantized
    model and with rsq's integer reference runtime: top-1, agreement, integer equality, and the
    latency at batch 1 and per image at batch 32.

    \b
    Examples:
      rsq verify exports/w4a4
      rsq verify exports/w4a4 --test-subset 1000 --out verify.json
      rsq verify exports/w4a4 --threads 1         # latency on one core, as on a phone's
    """
    from .quiet import third_party_notes_off
    from .verify import verify_export

    with third_party_notes_off():
        result = verify_export(export_dir, test_subset=test_subset, data_dir=data_dir, latency=latency,
                               threads=threads)
    if out:
        from .results import write_json_atomic

        try:
            write_json_atomic(result, out)
        except OSError as exc:
            raise RsqError(f"cannot write {out}: {exc.strerror or exc}") from None
    return 0


# ----------------------------------------------------------------------------- small commands


@cli.command()
def models():
    """List the model names `rsq train --model` takes.

    \b
    Example:
      rsq models
    """
    from .models import list_models

    click.echo("\n".join(list_models()))
    return 0


@cli.command()
@click.argument("name", required=False)
def recipes(name):
    """List the shipped recipes (`rsq train RECIPE`), or print one recipe's TOML with its comments.

    \b
    Examples:
      rsq recipes
      rsq recipes fashion_mnist_w8a8 > my_recipe.toml   # then: rsq train my_recipe.toml
    """
    from .config import build_config, read_recipe, recipe_names
    from .evaluate import config_quant, quant_text

    if name:
        click.echo(read_recipe(name)[1], nl=False)
        return 0
    rows = [("recipe", "model", "resolutions", "epochs", "bits")]
    for recipe in recipe_names():
        config = build_config(recipe, {})  # as `rsq train RECIPE` resolves it: the table cannot drift from the files
        rows.append((recipe, config.model, ",".join(map(str, config.resolutions)), str(config.epochs),
                     quant_text(config_quant(config))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


@cli.command(name="fetch-data")
def fetch_data():
    """Copy Fashion-MNIST from Debian's package into the user cache (no download at run time).

    \b
    Example:
      rsq fetch-data
    """
    from .data.fashion_mnist import fetch

    click.echo(f"Fashion-MNIST is in {fetch()}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The console script: the exit code of ``rsq ARGV`` (never a traceback for bad input)."""
    return cli.main([str(a) for a in argv] if argv is not None else None, "rsq", standalone_mode=False)


if __name__ == "__main__":
    sys.exit(main())
