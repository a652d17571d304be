"""Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package.

rsq never downloads at run time: the files are found where Debian installs them, in
``$RSQ_DATA_DIR`` or in the user cache, which ``rsq fetch-data`` fills from the Debian package
(``apt-get download`` + ``dpkg-deb -x``, no root needed).
"""
from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import RsqError

DEBIAN_PACKAGE = "dataset-fashion-mnist"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
NUM_CLASSES = 10
MEAN, STD = (0.2860,), (0.3530,)
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "rsq" / "fashion-mnist"


def _has_files(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def find_dir(data_dir: Optional[str] = None) -> Path:
    """The folder holding the four IDX files, or an error that says how to get them."""
    if data_dir:
        # An explicit folder is the only candidate: never fall back silently to another copy.
        candidates = [Path(data_dir)]
    else:
        candidates = [Path(os.environ["RSQ_DATA_DIR"])] if os.environ.get("RSQ_DATA_DIR") else []
        candidates += [SYSTEM_DIR, cache_dir()]
    for folder in candidates:
        if _has_files(folder):
            return folder
    if data_dir:
        raise RsqError(f"data folder {data_dir} does not hold the four Fashion-MNIST IDX .gz files")
    raise RsqError(
        f"Fashion-MNIST not found in {SYSTEM_DIR} or {cache_dir()}; run `rsq fetch-data` "
        f"(fetches Debian's {DEBIAN_PACKAGE})"
    )


def fetch(dest: Optional[Path] = None) -> Path:
    """Fill the cache from Debian's package (works without root); returns the folder."""
    if _has_files(SYSTEM_DIR):
        return SYSTEM_DIR
    dest = dest or cache_dir()
    if _has_files(dest):
        return dest
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RsqError(f"apt-get and dpkg-deb are needed to fetch {DEBIAN_PACKAGE}")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(["apt-get", "download", DEBIAN_PACKAGE], cwd=tmp,
                                capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if result.returncode != 0 or not debs:
            last = (result.stderr.strip().splitlines() or ["no .deb file"])[-1]
            raise RsqError(f"apt-get download {DEBIAN_PACKAGE} failed: {last} (try `apt-get update`)")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(tmp) / "x")], check=True)
        source = Path(tmp) / "x" / SYSTEM_DIR.relative_to("/")
        dest.mkdir(parents=True, exist_ok=True)
        for pair in FILES.values():
            for name in pair:
                # Copy then rename, so an interrupted fetch never leaves a truncated file.
                shutil.copyfile(source / name, dest / (name + ".part"))
                os.replace(dest / (name + ".part"), dest / name)
    return dest


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise RsqError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_dims:
        raise RsqError(f"{path} is not an unsigned-byte IDX file with {expected_dims} dimensions")
    if len(data) < 4 + 4 * expected_dims:
        raise RsqError(f"{path} is truncated: its IDX header is incomplete")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * expected_dims)
    if body.size != int(np.prod(shape)):
        raise RsqError(f"{path} is truncated: header says {shape}, found {body.size} values")
    return body.reshape(shape)


def load(split: str, data_dir: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N,1,28,28], labels int64 [N]) of one split."""
    folder = find_dir(data_dir)
    image_file, label_file = FILES[split]
    images = _read_idx(folder / image_file, 3)
    labels = _read_idx(folder / label_file, 1)
    if len(images) != len(labels):
        raise RsqError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    if labels.size and labels.max() >= NUM_CLASSES:
        raise RsqError(f"{folder / label_file}: label {int(labels.max())} out of range 0..{NUM_CLASSES - 1}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
