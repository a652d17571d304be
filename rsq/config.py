"""The training configuration: one flat dataclass, the single schema of every setting.

Each field's metadata (made by ``setting``) carries its help text, its choices or numeric range,
and how it appears on the command line. `rsq train`'s options, the recipe check, the saved
``config.toml`` and ``TrainConfig.validate`` all read it, so a setting is described once.
``TrainConfig()``'s defaults are the embedded default recipe (``recipes/fashion_mnist.toml``).
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import tomli_w

from .distill import DISTILL_MODES
from .errors import RsqError, choices_error
from .nn.quantizers import VALID_BITS
from .quantize import FIRST_LAST_POLICIES, QUANTIZERS, RESIDUAL_OR_SHORTCUT

DATA_SETS = ("fashion_mnist", "imagefolder")
DEVICES = ("auto", "cpu", "cuda")
AMP_SETTINGS = ("auto", "bf16", "off")
HEAD_GRADS = ("sum", "mean")
CONV_DECAYS = ("single", "sum")
AUGMENT_POLICIES = ("auto", "small", "imagenet")
NORMALIZE_CHOICES = ("auto", "estimate", "imagenet")
MAX_SEED = 2**63 - 1  # what torch.manual_seed and the data generators accept
RECIPE_PACKAGE = "rsq.recipes"


@dataclass(frozen=True)
class Range:
    """The values a numeric setting accepts: finite, at least ``low`` (above it when ``open``), at most ``high``."""

    low: float = 0
    open: bool = False
    high: Optional[float] = None

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is refused ("must be at least 1"), or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if value < self.low or (self.open and value == self.low):
            if self.open:
                return f"must be greater than {self.low}"
            return "must not be negative" if self.low == 0 else f"must be at least {self.low}"
        if self.high is not None and value > self.high:
            return f"must be at most {self.high}"
        return None


def setting(default, help: str, *, choices: tuple = (), range: Optional[Range] = None, what: str = "",
            cli: str = "option", bits: bool = False):
    """A TrainConfig field and its schema.

    choices: the allowed values (``what`` names them in the error: "unknown distill mode 'x'").
    range: for numbers; every int/float setting has one (default: not negative).
    cli: "option" (``--name VALUE``), "flag" (``--name`` sets True), "switch" (``--name/--no-name``),
         "bits" (set through `rsq train --bits`, which takes one bit width or a list).
    bits: a bit width, parsed on the command line with its own messages.
    """
    meta = {"help": help, "choices": tuple(choices), "range": range, "what": what, "cli": cli, "bits": bits}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # model and data
    model: str = setting("resnet20", "model name (see `rsq models`)")
    data: str = setting("fashion_mnist", "data set: the embedded Fashion-MNIST, or an image folder",
                        choices=DATA_SETS, what="data set")
    data_dir: str = setting("", "data folder (for imagefolder: ROOT with ROOT/train/CLASS and ROOT/val/CLASS)")
    resolutions: list[int] = setting([28, 24, 20, 16, 12], "resolutions, comma-separated, e.g. 224,192,160,128,96")
    subset: int = setting(0, "train on the first N images of a fixed shuffle (0 = all)")
    # augmentation and input handling (image folders; crop_pad and flip apply to Fashion-MNIST too)
    augment: str = setting("auto", "image-folder augmentation: small (pad and crop, test: resize whole), imagenet "
                           "(random resized crop, test: resize + centre crop), auto (small for images of at most "
                           "64 px)", choices=AUGMENT_POLICIES, what="augmentation")
    crop_pad: int = setting(2, "pixels of zero padding before the random crop (small-image augmentation)")
    crop_scale: float = setting(0.08, "smallest crop area of the random resized crop (imagenet augmentation)",
                                range=Range(0, open=True, high=1))
    flip: bool = setting(True, "random horizontal flip", cli="switch")
    in_chans: int = setting(0, "image-folder channels: 1 (grayscale), 3, or 0 as the images are",
                            range=Range(0, high=3))
    normalize: str = setting("auto", "image-folder normalisation: estimate (mean/std of 512 training images), "
                             "imagenet, or auto (imagenet for large RGB images, else estimate)", choices=NORMALIZE_CHOICES, what="normalisation")
    test_subset: int = setting(0, "evaluate on the first N test images (0 = all)")
    # optimisation
    epochs: int = setting(4, "training epochs", range=Range(1))
    batch_size: int = setting(128, "global batch size (split over DDP ranks)", range=Range(1))
    lr: float = setting(0.1, "peak learning rate (cosine schedule after a linear warm-up)", range=Range(0, open=True))
    momentum: float = setting(0.9, "SGD momentum", range=Range(0, high=0.999))
    weight_decay: float = setting(5e-4, "weight decay (never applied to alpha or quantizer steps)")
    warmup_epochs: float = setting(0.2, "linear warm-up length in epochs")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropies", range=Range(0, high=0.999))
    distill: str = setting("full", "MRED: full (the ensemble and every higher resolution teach every lower one), "
                           "vanilla (the ensemble teaches all) or none", choices=DISTILL_MODES, what="distill mode")
    distill_weight: float = setting(1.0, "weight of the MRED distillation terms (the ensemble's own loss keeps 1)")
    distill_ramp: float = setting(0.5, "fraction of the training steps over which the MRED distillation weight "
                                  "rises linearly from 0 to distill_weight (the paper: 0, full weight from the "
                                  "first step)", range=Range(0, high=1))
    distill_temperature: float = setting(1.0, "temperature of the MRED distillation terms: KL between the teacher's "
                                         "and the student's softmax at T, times T^2 so its gradient keeps its "
                                         "size (the paper: 1)", range=Range(0, open=True))
    head_grad: str = setting("mean", "how the classifier (the model's Linear layers, shared by every mode and "
                             "followed by no BN) takes its modes' gradients: mean (its learning rate divided by "
                             "the number of modes: a single model's step) or sum (the paper's summed loss: n "
                             "times a single model's step)", choices=HEAD_GRADS, what="head-grad setting")
    conv_decay: str = setting("sum", "weight decay of the convolutions (shared by every mode, each followed by "
                              "its mode's BN): sum (the decay times the number of modes, as the summed loss "
                              "multiplies their gradient: the steps of a mean loss at n times the learning rate; "
                              "full-precision weights only) or single (one model's decay: the paper)",
                              choices=CONV_DECAYS,
                              what="conv-decay setting")
    conv_decay_factor: float = setting(1.0, "with conv_decay sum and more than one mode: a further factor on the "
                                       "convolutions' decay (2: 2n times the weight decay; a single-mode run "
                                       "keeps one model's)", range=Range(0, open=True))
    norm_lr_factor: float = setting(5.0, "with more than one mode and full-precision weights: the private "
                                    "BatchNorms' weights and biases learn at this factor times the learning rate, "
                                    "as the convolutions before them take every mode's gradient (1: a single "
                                    "model's step, the paper)", range=Range(0, open=True))
    seed: int = setting(0, "random seed (a run repeats exactly on the CPU)", range=Range(0, high=MAX_SEED))
    # quantization (32/32 = full precision)
    weight_bits: int = setting(32, "weight bits: 2-8, or 32 for full precision", bits=True)
    act_bits: int = setting(32, "activation bits: 2-8, or 32 for full precision", bits=True)
    bit_widths: list[int] = setting([], "bit widths one model switches between, e.g. 2,4,8,32 (a mode per "
                                    "resolution and bit width; weights shared)", cli="bits")
    bit_distill: bool = setting(True, "with --bits LIST: KD from the widest bit width to every narrower one at "
                                "each resolution", cli="switch")
    quantizer: str = setting("lsq", "lsq (learned step size) or lqnet (LQ-Nets, the paper's)",
                             choices=tuple(QUANTIZERS), what="quantizer")
    first_last: str = setting("8", "bits of the first conv and last FC: 8, fp, or the same as the rest",
                              choices=FIRST_LAST_POLICIES, what="first/last layer policy")
    act_per_resolution: bool = setting(False, "one activation quantizer per resolution (default: shared)",
                                       cli="flag")
    quantized_shortcut: bool = setting(False, "every residual block quantizes its input once, on its first conv's "
                                       "grid, and its shortcut adds that quantized tensor: an integer residual "
                                       "stream, which int8 backends fuse into each block's second conv (the paper: "
                                       "float shortcuts, --no-quantized-shortcut)", cli="switch")
    residual_bits: int = setting(32, "bits of the residual stream (2-8): what each residual add reads and each block's "
                                 "output on learned grids, as int8 targets compute them (32: float, the paper's)",
                                 bits=True)
    init: str = setting("", "start from this full-precision checkpoint")
    teacher: str = setting("", "also distil from this full-precision RS-Net checkpoint at each resolution")
    # running
    out: str = setting("runs/fashion_mnist", "run folder")
    device: str = setting("auto", "auto picks CUDA when there is a GPU", choices=DEVICES, what="device")
    amp: str = setting("auto", "bf16 autocast: auto (on CUDA only), bf16 (also on a CPU; full precision about 1.5x "
                                  "faster where it has AMX) or off", choices=AMP_SETTINGS, what="amp setting")
    channels_last: bool = setting(True, "channels_last memory layout (faster on CPUs and GPUs)", cli="switch")
    mode_threads: bool = setting(True, "on the CPU, run a step's modes side by side on two threads (one intra-op "
                                 "thread each) instead of each mode on all threads; same result, faster for small "
                                 "networks", cli="switch")
    fused_bn: bool = setting(True, "on the CPU, each BatchNorm with its ReLU (and a block's add) as one C kernel in "
                             "training steps that run one thread per mode; the same math in fewer passes over memory "
                             "(needs a C compiler; without one the plain modules run)", cli="switch")
    compile: bool = setting(False, "torch.compile, one static graph per resolution (pays off on long runs)",
                            cli="switch")
    workers: int = setting(4, "DataLoader workers (image folders)")
    checkpoint_every: int = setting(0, "also checkpoint every N steps (0 = at the end of each epoch only)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] and value not in meta["choices"]:
                raise choices_error(meta["what"], value, meta["choices"])
            if meta["bits"] and value not in VALID_BITS:
                raise RsqError(f"{f.name} {value!r} is not supported; use 2-8 or 32 (full precision)")
            if f.type in ("int", "float"):
                problem = (meta["range"] or Range()).problem(value)
                if problem:
                    raise RsqError(f"{f.name} {problem}, got {value}")
        if self.bit_widths:
            from .convert import check_bit_widths

            self.bit_widths = check_bit_widths(self.bit_widths)
            if (self.weight_bits, self.act_bits) != (32, 32):
                raise RsqError(f"bit widths {self.bit_widths} give every mode its own weight and activation bits; "
                               f"drop weight_bits/act_bits ({self.weight_bits}/{self.act_bits})")
        if self.quantized_shortcut and not self.quantized:
            raise RsqError("quantized_shortcut needs quantized activations: add --bits, or --no-quantized-shortcut")
        if self.residual_bits != 32:
            if self.act_bits == 32:
                raise RsqError("residual_bits needs quantized activations of one bit width: add --bits B")
            if self.quantized_shortcut:
                raise RsqError(RESIDUAL_OR_SHORTCUT)
        if self.in_chans not in (0, 1, 3):
            raise RsqError(f"in_chans must be 0 (as the images are), 1 or 3, got {self.in_chans}")
        if not self.resolutions:
            raise RsqError("resolutions must name at least one resolution")
        if any(r <= 0 for r in self.resolutions) or len(set(self.resolutions)) != len(self.resolutions):
            raise RsqError(f"resolutions {self.resolutions} must be distinct positive integers")
        self.resolutions = sorted(self.resolutions, reverse=True)

    @property
    def quantized(self) -> bool:
        return self.weight_bits != 32 or self.act_bits != 32 or bool(self.bit_widths)

    @property
    def joint(self) -> bool:
        """One model that switches bit widths as well as resolutions."""
        return bool(self.bit_widths)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        """A validated copy with ``changes``; the original is never modified."""
        return dataclasses.replace(self, **changes)


def schema() -> list[dataclasses.Field]:
    """Every setting, in declaration order, with its metadata."""
    return list(fields(TrainConfig))


def _field_types() -> dict[str, str]:
    return {f.name: f.type for f in fields(TrainConfig)}


def _check_type(key: str, value: Any, kind: str) -> Any:
    expected = _field_types()[key]
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[expected]
    if not ok:
        raise RsqError(f"{kind} key {key!r} must be of type {expected}, got {value!r}")
    return float(value) if expected == "float" else value


def check_keys(values: dict[str, Any], source: str, kind: str = "recipe") -> dict[str, Any]:
    """``values`` with types checked; an unknown key is an error that names it and ``source``."""
    allowed = _field_types()
    for key in values:
        if key not in allowed:
            raise choices_error(f"key in {source}:", key, sorted(allowed))
    return {key: _check_type(key, value, kind) for key, value in values.items()}


def recipe_names() -> list[str]:
    """The recipes shipped inside the installed package."""
    return sorted(p.name[:-5] for p in resources.files(RECIPE_PACKAGE).iterdir() if p.name.endswith(".toml"))


def read_recipe(name_or_path: str) -> tuple[str, str]:
    """(where, TOML text) of a shipped recipe by name, or of a recipe file by path.

    Names are looked up only in the package, so a ``recipes/`` folder in the working directory
    never shadows a shipped recipe; a path (``*.toml`` or an existing file) is read as given.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RsqError(f"recipe file {name_or_path} does not exist")
        return str(path), path.read_text()
    shipped = resources.files(RECIPE_PACKAGE) / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise choices_error("recipe", name_or_path, recipe_names())
    return name_or_path, shipped.read_text()


def load_recipe(name_or_path: str) -> dict[str, Any]:
    where, text = read_recipe(name_or_path)
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RsqError(f"recipe {where} is not valid TOML: {exc}") from None
    return check_keys(raw, f"recipe {where}")


def build_config(recipe: Optional[str], overrides: dict[str, Any]) -> TrainConfig:
    """Recipe values, then overrides (those that are not None), validated once."""
    values = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: Path) -> None:
    from .results import write_text_atomic

    write_text_atomic(tomli_w.dumps(config.to_dict()), path)


# Settings added after runs were saved whose default now differs from what those runs did: a saved
# config without the key ran (and resumes) the old way.
BEFORE_THE_SETTING = {"distill_ramp": 0.0, "head_grad": "sum", "conv_decay": "single", "norm_lr_factor": 1.0}


def config_from_dict(values: dict[str, Any], source: str = "saved config") -> TrainConfig:
    """A saved config (checkpoint, config.toml); a key this rsq does not know is an error, never dropped."""
    return TrainConfig(**{**BEFORE_THE_SETTING, **check_keys(dict(values), source, kind="config")})
