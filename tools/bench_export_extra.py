"""Helpers of tools/bench_export.py and its siblings: briefly trained Fashion-MNIST and ResNet-18 RS-Net
checkpoints for timing and sizes, and ExecuTorch XNNPACK as a timed callable with its build time."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

R18_RESOLUTIONS = [224, 192, 160, 128, 96]


def fashion_mnist_checkpoint(run: Path, bits: int, **config) -> Path:
    """The default Fashion-MNIST ResNet-20 RS-Net at W{bits}A{bits} trained 8 steps on 512 images, in the run
    folder ``run`` (``config``: more TrainConfig fields): sizes and latency do not depend on how well a
    model is trained."""
    from rsq.config import TrainConfig
    from rsq.train import train
    train(TrainConfig(weight_bits=bits, act_bits=bits, subset=512, test_subset=64, epochs=1, batch_size=64,
                      out=str(run), device="cpu", **config), overwrite=True)
    return run


def resnet18_checkpoint(path: Path, resolutions=R18_RESOLUTIONS, bits: int = 4,
                        quantized_shortcut: bool = False) -> Path:
    """An ImageNet-shaped torchvision ResNet-18 RS-Net, W{bits}A{bits} (first/last 8), untrained but with its
    quantizers and BN statistics initialised by training-mode forwards on random images: latency and
    size do not depend on the weights' values, and export needs initialised steps."""
    from rsq.checkpoint import FORMAT, VERSION, atomic_save, quant_config
    from rsq.config import TrainConfig
    from rsq.convert import using_mode
    from rsq.models import create_model
    from rsq.quantize import quantize_

    # The export reads the input normalisation from the config's data folder: a two-image stand-in.
    from PIL import Image
    for split in ("train", "val"):
        for label in ("a", "b"):
            (path.parent / "data" / split / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (256, 256), (120, 60, 200)).save(path.parent / "data" / split / label / "0.png")
    config = TrainConfig(model="resnet18", data="imagefolder", data_dir=str(path.parent / "data"), in_chans=3,
                         normalize="imagenet", resolutions=list(resolutions), weight_bits=bits, act_bits=bits,
                         quantized_shortcut=quantized_shortcut)
    torch.manual_seed(0)
    # Built as rsq.checkpoint.build_model rebuilds it, so the state dict loads back.
    model = create_model("resnet18", 1000, 3, resolutions=list(resolutions))
    quantize_(model, quant_config(config))
    model.train()
    with torch.no_grad():
        for r in resolutions:
            with using_mode(model, r):
                model(torch.randn(4, 3, r, r))
    atomic_save({"format": FORMAT, "version": VERSION, "config": config.to_dict(), "num_classes": 1000,
                 "in_chans": 3, "resolutions": list(resolutions), "calibrated": {}, "model": model.state_dict(),
                 "ensemble": {}, "complete": True}, path)
    return path


def executorch_program(model, resolutions, in_chans: int, path: Path):
    """Write one .pte (a method per resolution); (program, seconds to lower). XNNPACK gets one thread."""
    from rsq.export.executorch import _runtime, write_executorch

    start = time.perf_counter()
    write_executorch(model, resolutions, in_chans, path)
    lowered = time.perf_counter() - start
    one_xnnpack_thread()
    return _runtime().load_program(path), lowered


def one_xnnpack_thread() -> None:
    """XNNPACK's pool would otherwise take every core; one thread keeps rows comparable."""
    from rsq.export.executorch import set_xnnpack_threads
    set_xnnpack_threads(1)


def executorch_engine(program, resolution: int, x: np.ndarray):
    """One image through the method ``r<resolution>``, loaded once (rsq's run_executorch reloads per call)."""
    from rsq.export.executorch import method_name

    method = program.load_method(method_name(resolution))
    image = torch.from_numpy(np.ascontiguousarray(x[:1], dtype=np.float32))
    return lambda: method.execute([image])[0]
