"""rsq.counting's MACs against fvcore's independent counter and against published figures."""
import math

import pytest
import torch
import torchvision

from rsq.convert import convert
from rsq.counting import summarize

fvcore_nn = pytest.importorskip("fvcore.nn")

RESOLUTIONS = (224, 160, 96)
# ResNet-18 MACs as published (rounded up to 0.01 G) for the RS-Net resolutions.
RESNET18_PUBLISHED_G = {224: 1.82, 192: 1.34, 160: 0.93, 128: 0.60, 96: 0.34}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Counting needs no speed-up, and extra threads crawl when other jobs share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: convert(getattr(torchvision.models, name)().eval(), RESOLUTIONS)
            for name in ("resnet18", "mobilenet_v2", "resnet50")}


def fvcore_macs(model, resolution):
    """fvcore counts one "flop" per multiply-accumulate; keep only conv and linear to match."""
    analysis = fvcore_nn.FlopCountAnalysis(model, torch.zeros(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    assert by_op["conv"] > 0 and by_op["linear"] > 0
    return by_op["conv"] + by_op["linear"]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_macs_match_fvcore(models, name, resolution):
    ours = summarize(models[name], resolution, 3)["macs"]
    assert ours == fvcore_macs(models[name], resolution)


def test_macs_shrink_with_resolution(models):
    macs = [summarize(models["resnet18"], r, 3)["macs"] for r in RESOLUTIONS]
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == len(macs)


def test_resnet18_macs_match_published_figures():
    model = convert(torchvision.models.resnet18().eval(), RESNET18_PUBLISHED_G)
    for resolution, published in RESNET18_PUBLISHED_G.items():
        macs = summarize(model, resolution, 3)["macs"]
        assert math.ceil(macs / 1e7) / 100 == published, (resolution, macs)
        assert abs(macs / 1e9 - published) < 0.01, (resolution, macs)
