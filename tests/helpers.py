"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""
import numpy as np
import torch

import rsq
from rsq.convert import using_mode
from rsq.data.multires import resize_batch
from rsq.runtime import dequantize_logits


def warmed_up(model: torch.nn.Module, resolutions, in_chans: int = 1, batch: int = 32,
              rounds: int = 3) -> torch.nn.Module:
    """``model`` in eval mode after ``rounds`` training-mode forwards of random images at every resolution:
    its quantizers initialised and each resolution's BN statistics set, as after a short training.
    The caller seeds torch's generator."""
    model.train()
    with torch.no_grad():
        for _ in range(rounds):
            for r in resolutions:
                with using_mode(model, r):
                    model(torch.randn(batch, in_chans, r, r))
    return model.eval()


def quantized_resnet20(bits: int, resolutions, **quant) -> torch.nn.Module:
    """A seeded ResNet-20 RS-Net for 10 classes of one-channel images, quantized W{bits}A{bits} (``quant``:
    more rsq.QuantConfig fields) and warmed_up at ``resolutions``."""
    torch.manual_seed(0)
    model = rsq.create_model("resnet20", 10, 1, resolutions=resolutions)
    rsq.quantize_(model, rsq.QuantConfig(weight_bits=bits, act_bits=bits, **quant))
    return warmed_up(model, resolutions)


def runtime_vs_fake_quant(model: torch.nn.Module, runtime, images: torch.Tensor,
                          resolution: int) -> tuple[float, float]:
    """(top-1 agreement, mean relative logit error) of rsq.runtime's integer logits against the fake-quant
    model's on ``images`` (NCHW, full size) resized to ``resolution``."""
    x = resize_batch(images, resolution)
    with torch.no_grad(), using_mode(model, resolution):
        fake = model(x).numpy()
    logits = runtime.run(x.numpy(), resolution)
    agreement = (fake.argmax(1) == logits.argmax(1)).mean()
    error = np.abs(dequantize_logits(runtime.model, logits, resolution) - fake).mean() / np.abs(fake).mean()
    return agreement, error
