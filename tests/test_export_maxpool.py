"""Max pooling in the integer export: the runtime op against torch, a small VGG-like net whose pooling
stays on a conv's narrow grid, and a torchvision ResNet-18 RS-Net (maxpool into an identity shortcut)."""
import numpy as np
import pytest
import torch
from torch import nn

import rsq
from rsq.convert import using_mode
from rsq.export.lower import lower
from rsq.quantize import QuantConfig, quantize_
from rsq.runtime import Runtime, dequantize_logits, load
from rsq.runtime.execute import max_pool

from helpers import warmed_up

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dtype,kernel,stride,padding", [(np.int32, 3, 2, 1), (np.int8, 2, 2, 0), (np.uint8, 3, 1, 1)])
def test_runtime_max_pool_equals_torch(dtype, kernel, stride, padding):
    info = np.iinfo(dtype)
    rng = np.random.default_rng(0)
    x = rng.integers(max(info.min, -2**30), min(info.max, 2**30), (2, 9, 11, 5)).astype(dtype)  # NHWC
    if dtype == np.int32:
        x[:, :3] = -(2**30)  # all-negative borders: the padding must not win
    attrs = {"kernel": [kernel, kernel], "stride": [stride, stride], "padding": [padding, padding]}
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2),
                                              kernel, stride, padding).permute(0, 2, 3, 1).numpy()
    out = max_pool(x, attrs)
    assert out.dtype == x.dtype and np.array_equal(out, expected.astype(dtype))


class _PoolNet(nn.Module):
    """conv -> relu -> maxpool -> conv: the pooling reads and writes the second conv's narrow grid."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 3, 2, 1)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _initialised(model, resolutions, in_chans=3):
    torch.manual_seed(0)
    return warmed_up(model, resolutions, in_chans, batch=8, rounds=2)


def _check(model, resolutions, tmp_path, min_agreement):
    ort = pytest.importorskip("onnxruntime")
    from rsq.export.onnx import write_onnx
    from rsq.export.packed import write_packed

    integer_model = lower(model)
    assert any(op.kind == "max_pool" for op in integer_model.ops)
    runtime = Runtime(integer_model)
    write_packed(integer_model, tmp_path / "packed")
    packed = Runtime(load(tmp_path / "packed"))
    for path, r in zip(write_onnx(integer_model, tmp_path / "onnx"), integer_model.resolutions):
        x = torch.randn(8, 3, r, r)
        ints = runtime.run(x.numpy(), r)
        with torch.no_grad(), using_mode(model, r):
            fake = model(x).numpy()
        logits = dequantize_logits(integer_model, ints, r)
        assert (fake.argmax(1) == logits.argmax(1)).mean() >= min_agreement
        assert np.abs(logits - fake).mean() < 0.02 * np.abs(fake).mean()  # a rare one-step flip, as elsewhere
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.array_equal(session.run(None, {"input": x.numpy()})[1], ints)
        assert np.array_equal(packed.run(x.numpy(), r), ints)
    return integer_model


def test_narrow_max_pool_matches_fake_quant_and_onnxruntime(tmp_path):
    model = _PoolNet()
    rsq.convert(model, [16, 8])
    quantize_(model, QuantConfig(4, 4, first_last="same"))
    integer_model = _check(_initialised(model, [16, 8]), [16, 8], tmp_path, 1.0)
    pools = [op for op in integer_model.ops if op.kind == "max_pool"]
    assert [integer_model.tensors[op.output].kind for op in pools] == ["narrow", "wide"]


def test_resnet18_rs_net_lowers_and_runs_bit_exact(tmp_path):
    model = rsq.create_model("resnet18", 10, 3, resolutions=[64, 32])
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
    integer_model = _check(_initialised(model, [64, 32]), [64, 32], tmp_path, 1.0)
    pool = next(op for op in integer_model.ops if op.kind == "max_pool")
    # relu(bn1(conv1)) is fused into conv1 (lo = 0); the pooled tensor feeds layer1.0's conv and its shortcut.
    assert integer_model.tables[64]["conv1"]["lo"][0] == 0
    assert integer_model.tensors[pool.output].kind == "wide"
