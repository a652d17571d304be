"""rsq.interop.brevitas: a trained RS-Net as a brevitas model at one resolution, and its QONNX export."""
import sys

import numpy as np
import onnx
import pytest
import torch

import rsq
from rsq.counting import layer_costs, summarize
from rsq.errors import RsqError

from helpers import quantized_resnet20

pytest.importorskip("brevitas")
pytest.importorskip("qonnx")
from rsq.interop.brevitas import QonnxRunner, qonnx_cost, to_brevitas, write_qonnx  # noqa: E402

RES = [16, 12]


def quantized_model(bits: int, quantizer: str = "lsq") -> torch.nn.Module:
    """A ResNet-20 RS-Net whose quantizers and BNs have seen data (as after a short training)."""
    return quantized_resnet20(bits, RES, quantizer=quantizer)


@pytest.fixture(scope="module")
def w2_qonnx(tmp_path_factory):
    model = quantized_model(2)
    path = write_qonnx(model, 12, 1, tmp_path_factory.mktemp("qonnx") / "w2a2_r12.onnx")
    return model, path


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_brevitas_model_computes_what_rsq_computes(bits, one_thread):
    model = quantized_model(bits)
    for r in RES:
        twin = to_brevitas(model, r)
        x = torch.randn(64, 1, r, r)
        with torch.no_grad(), rsq.using_mode(model, r):
            expected = model(x)
        with torch.no_grad():
            got = twin(x)
        # The same steps, grid, rounding and float ops: the same numbers, not just close ones.
        assert torch.equal(got, expected), (bits, r, (got - expected).abs().max())
    # the source model is untouched, and the brevitas scales are rsq's steps
    assert rsq.mode_state(model).resolutions == RES
    scale = twin.conv1.weight_quant.scale().detach()
    assert torch.allclose(scale.flatten(), model.conv1.weight_quantizer.step.detach().flatten(), rtol=1e-6)


def test_qonnx_keeps_the_bit_widths_and_runs_like_rsq(w2_qonnx, one_thread):
    model, path = w2_qonnx
    graph = onnx.load(str(path)).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    quant_nodes = [n for n in graph.node if n.op_type == "Quant"]
    bit_widths = {float(constants[n.input[3]]) for n in quant_nodes if n.input[3] in constants}
    assert bit_widths == {2.0, 8.0}  # W2A2 inside, 8-bit first conv and last FC
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad(), rsq.using_mode(model, 12):
        expected = model(x).numpy()
    got = QonnxRunner(path)(x.numpy())
    assert np.allclose(got, expected, atol=1e-4), np.abs(got - expected).max()


def test_negative_learned_steps_keep_their_sign_in_brevitas_and_qonnx(tmp_path, one_thread):
    # LSQ can drive a weight step below zero (short runs do, in the first conv and last FC). rsq computes
    # s * round(clamp(w / s, -8, 7)): the grid |s| * [-7, 8]. brevitas's default scale is |s|, whose
    # grid |s| * [-8, 7] moves every weight at the edge by a step; so did the QONNX file.
    model = quantized_model(4)
    at_edge = 0
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (rsq.nn.QuantConv2d, rsq.nn.QuantLinear)):
                quantizer = layer.weight_quantizer
                quantizer.step[0].mul_(-0.3)  # negative, and small: some weights reach the grid's edge
                at_edge += int(((layer.weight[0] / quantizer.step[0]).abs() >= quantizer.qp + 0.5).sum())
    assert at_edge > 0
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad(), rsq.using_mode(model, 12):
        expected = model(x)
    path = write_qonnx(model, 12, 1, tmp_path / "w4a4_r12.onnx")
    graph = onnx.load(str(path)).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    quant_nodes = [n for n in graph.node if n.op_type == "Quant"]
    bit_widths = {float(constants[n.input[3]]) for n in quant_nodes if n.input[3] in constants}
    assert bit_widths == {4.0, 8.0}  # still 4-bit integers (8-bit first conv and last FC)
    ran = QonnxRunner(path)(x.numpy())
    assert np.allclose(ran, expected.numpy(), atol=1e-4), np.abs(ran - expected.numpy()).max()
    assert any((constants[n.input[1]] < 0).any() for n in quant_nodes if n.input[1] in constants)  # the signs
    with torch.no_grad():
        got = to_brevitas(model, 12)(x)
    assert torch.equal(got, expected), (got - expected).abs().max()  # and the brevitas model, bit for bit


def test_qonnx_inference_cost_equals_rsq_counting(w2_qonnx):
    model, path = w2_qonnx
    cost = qonnx_cost(path)
    ours = summarize(model, 12, 1)
    assert cost["macs"] == ours["macs"] and cost["bitops"] == ours["bitops"]
    per_layer = sorted((c.macs, c.macs * c.weight_bits * c.act_bits) for c in layer_costs(model, 12, 1))
    assert sorted(cost["layers"].values()) == per_layer


def test_lq_nets_and_full_precision_models_are_refused():
    with pytest.raises(RsqError, match="LQ-Nets"):
        to_brevitas(quantized_model(2, "lqnet"), 12)
    with pytest.raises(RsqError, match="not quantized"):
        to_brevitas(rsq.create_model("resnet20", 10, 1, resolutions=RES), 12)
    with pytest.raises(RsqError, match="known"):
        to_brevitas(quantized_model(4), 20)


def test_a_missing_brevitas_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "brevitas.quant.scaled_int", None)
    with pytest.raises(RsqError, match="needs the Python package 'brevitas'.*pip install brevitas"):
        to_brevitas(quantized_model(4), 12)
