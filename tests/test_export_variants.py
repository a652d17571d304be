"""Integer export beyond the default recipe: negative steps and gammas, per-resolution activation steps,
first/last layers at the same low bits (a sub-8-bit input grid: ONNX clips after QuantizeLinear)."""
import numpy as np
import pytest
import torch

import rsq
from rsq.convert import using_mode
from rsq.export.lower import lower
from rsq.quantize import QuantConfig, quantize_
from rsq.runtime import Runtime, dequantize_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def initialised_model(config: QuantConfig):
    """An untrained RS-Net at 12 and 8 px whose quantizers and BN statistics saw random images."""
    torch.manual_seed(0)
    model = rsq.create_model("resnet20", num_classes=10, in_chans=1)
    rsq.convert(model, [12, 8])
    quantize_(model, config)
    model.train()
    with torch.no_grad():
        for r in (12, 8):
            model(torch.randn(16, 1, r, r))
    return model


def assert_agrees(model, integer_model):
    x = torch.randn(32, 1, 12, 12)
    runtime = Runtime(integer_model)
    for r in (12, 8):
        xr = torch.nn.functional.interpolate(x, size=(r, r), mode="bilinear") if r != 12 else x
        with torch.no_grad(), using_mode(model, r):
            fake = model(xr).numpy()
        logits = dequantize_logits(integer_model, runtime.run(xr.numpy(), r), r)
        assert (fake.argmax(1) == logits.argmax(1)).mean() >= 0.9
        assert np.abs(logits - fake).mean() < 0.02 * np.abs(fake).mean()


def test_negative_steps_and_gammas_keep_agreement():
    model = initialised_model(QuantConfig(4, 4))
    with torch.no_grad():
        model.fc.weight_quantizer.step[:3].neg_()                      # what training did to a real checkpoint
        model.layer1[0].conv1.weight_quantizer.step[:2].neg_()
        model.layer2[0].bn1.bns["r12"].weight[:4].neg_()                # one resolution only
    model.eval()
    integer_model = lower(model)
    assert integer_model.scales[12][integer_model.output] > 0
    assert (integer_model.tables[12]["layer2.0.conv1"]["m0"][:4] < 0).all()
    assert (integer_model.tables[8]["layer2.0.conv1"]["m0"][:4] > 0).all()
    assert_agrees(model, integer_model)


def test_per_resolution_steps_and_low_bit_first_layer_match_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from rsq.export.onnx import write_onnx

    model = initialised_model(QuantConfig(3, 3, first_last="same", act_per_mode=True)).eval()
    integer_model = lower(model)
    first = integer_model.ops[0]
    assert first.kind == "quantize_input" and integer_model.tensors[first.output].bits == 3
    assert integer_model.scales[12][first.output] != integer_model.scales[8][first.output]
    assert_agrees(model, integer_model)
    runtime = Runtime(integer_model)
    switchable = None
    for path, r in zip(write_onnx(integer_model, tmp_path), integer_model.resolutions):
        x = np.random.default_rng(r).standard_normal((8, 1, r, r)).astype(np.float32) * 3
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.array_equal(session.run(None, {"input": x})[1], runtime.run(x, r))
        # The switchable graph gathers the input's step too, where it differs by resolution.
        switchable = switchable or ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert np.array_equal(switchable.run(None, {"input": x})[1], runtime.run(x, r))


def test_switchable_onnx_follows_a_bias_shift_that_differs_by_resolution(tmp_path):
    """lower picks a layer's bias shift P from its bias's size, which BN sets per resolution: the switchable
    graph gathers 2**P like the other tables (made to differ here: P - 1 and the bias halved at 8 px)."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from rsq.export.onnx import write_onnx

    integer_model = lower(initialised_model(QuantConfig(4, 4)).eval())
    table = integer_model.tables[8]["layer1.0.conv1"]
    assert table["bias_shift"][0] >= 1
    table["bias_shift"] = table["bias_shift"] - 1
    table["bias"] = table["bias"] // 2
    runtime = Runtime(integer_model)
    write_onnx(integer_model, tmp_path)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for r in integer_model.resolutions:
        x = np.random.default_rng(r).standard_normal((8, 1, r, r)).astype(np.float32)
        assert np.array_equal(session.run(None, {"input": x})[1], runtime.run(x, r))
