"""The training configuration: one flat dataclass, filled from a TOML recipe and CLI flags."""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from .errors import RsqError, choices_error

DISTILL_CHOICES = ("full", "vanilla", "none")
DATA_CHOICES = ("fashion_mnist", "imagefolder")
AMP_CHOICES = ("auto", "bf16", "off")
QUANTIZER_CHOICES = ("lsq", "lqnet")
FIRST_LAST_CHOICES = ("8", "fp", "same")
VALID_BITS = (2, 3, 4, 5, 6, 7, 8, 32)
RECIPE_DIRS = (Path("recipes"), Path(__file__).resolve().parent.parent / "recipes")


@dataclass
class TrainConfig:
    # model and data
    model: str = "resnet20"
    data: str = "fashion_mnist"
    data_dir: str = ""
    resolutions: list[int] = field(default_factory=lambda: [28, 24, 20, 16, 12])
    subset: int = 0          # train on the first N images of a fixed shuffle (0 = all)
    test_subset: int = 0     # evaluate on the first N test images (0 = all)
    # optimisation
    epochs: int = 5
    batch_size: int = 128    # global batch, split over DDP ranks
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.2
    label_smoothing: float = 0.0
    distill: str = "full"
    seed: int = 0
    # quantization (32/32 = full precision)
    weight_bits: int = 32
    act_bits: int = 32
    quantizer: str = "lsq"
    first_last: str = "8"
    act_per_resolution: bool = False
    init: str = ""           # start from this (full-precision) checkpoint
    teacher: str = ""        # extra KD from this full-precision RS-Net at each resolution
    # running
    out: str = "runs/default"
    device: str = "auto"
    amp: str = "auto"
    channels_last: bool = True
    compile: bool = False
    workers: int = 4
    checkpoint_every: int = 0  # also checkpoint every N steps (0 = at the end of each epoch only)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.distill not in DISTILL_CHOICES:
            raise choices_error("distill mode", self.distill, DISTILL_CHOICES)
        if self.data not in DATA_CHOICES:
            raise choices_error("data set", self.data, DATA_CHOICES)
        if self.amp not in AMP_CHOICES:
            raise choices_error("amp setting", self.amp, AMP_CHOICES)
        if self.quantizer not in QUANTIZER_CHOICES:
            raise choices_error("quantizer", self.quantizer, QUANTIZER_CHOICES)
        if self.first_last not in FIRST_LAST_CHOICES:
            raise choices_error("first/last layer policy", self.first_last, FIRST_LAST_CHOICES)
        for name in ("weight_bits", "act_bits"):
            if getattr(self, name) not in VALID_BITS:
                raise RsqError(f"{name} {getattr(self, name)!r} is not supported; use 2-8 or 32 (full precision)")
        if not self.resolutions:
            raise RsqError("resolutions must name at least one resolution")
        if any(r <= 0 for r in self.resolutions) or len(set(self.resolutions)) != len(self.resolutions):
            raise RsqError(f"resolutions {self.resolutions} must be distinct positive integers")
        self.resolutions = sorted(self.resolutions, reverse=True)
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise RsqError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("subset", "test_subset", "workers", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise RsqError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not self.lr > 0:
            raise RsqError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            raise RsqError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or not 0 <= self.momentum < 1:
            raise RsqError("weight_decay and warmup_epochs must be >= 0 and momentum in [0, 1)")

    @property
    def quantized(self) -> bool:
        return self.weight_bits != 32 or self.act_bits != 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types() -> dict[str, Any]:
    return {f.name: f.type for f in fields(TrainConfig)}


def _check_type(key: str, value: Any) -> Any:
    expected = _field_types()[key]
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "list[int]": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
    }[expected]
    if not ok:
        raise RsqError(f"recipe key {key!r} must be of type {expected}, got {value!r}")
    return float(value) if expected == "float" else value


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise RsqError(f"recipe file {name_or_path} does not exist")
        return path
    for folder in RECIPE_DIRS:
        candidate = folder / f"{name_or_path}.toml"
        if candidate.is_file():
            return candidate
    known = sorted({p.stem for folder in RECIPE_DIRS if folder.is_dir() for p in folder.glob("*.toml")})
    raise choices_error("recipe", name_or_path, known)


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = find_recipe(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RsqError(f"recipe {path} is not valid TOML: {exc}") from None
    allowed = _field_types()
    for key in raw:
        if key not in allowed:
            raise choices_error(f"key in recipe {path}:", key, sorted(allowed))
    return {key: _check_type(key, value) for key, value in raw.items()}


def build_config(recipe: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """Recipe values, then CLI overrides (those that are not None), validated once."""
    values = load_recipe(recipe) if recipe else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values)


def save_config(config: TrainConfig, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(tomli_w.dumps(config.to_dict()))
    tmp.replace(path)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    allowed = _field_types()
    return TrainConfig(**{k: v for k, v in values.items() if k in allowed})
