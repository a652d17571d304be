"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""
import torch

from rsq.convert import using_mode


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
