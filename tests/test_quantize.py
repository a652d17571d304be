"""quantize_ on whole models: swaps, signs, first/last bits, exact full precision, BitOPs, training."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsq.convert import convert
from rsq.counting import summarize
from rsq.errors import RsqError
from rsq.models import create_model
from rsq.nn import QuantConv2d, QuantLinear, SwitchableQuantizer
from rsq.quantize import QuantConfig, bits_label, dequantize_, quantize_

pytestmark = pytest.mark.usefixtures("one_thread")


def quant_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantConv2d, QuantLinear))}


def test_every_conv_and_linear_is_swapped_on_the_same_parameters():
    model = create_model("resnet20", 10, 1, [16, 8])
    before = {n: p for n, p in model.named_parameters()}
    quantize_(model, QuantConfig())
    after = dict(model.named_parameters())
    for name, p in before.items():
        assert after[name] is p
    assert not [m for m in model.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert len(quant_layers(model)) == 22
    with pytest.raises(RsqError, match="already quantized"):
        quantize_(model, QuantConfig())
    dequantize_(model)
    assert not quant_layers(model) and {n: p for n, p in model.named_parameters()} == before


@pytest.mark.parametrize("name,res", [("resnet20", 16), ("mobilenet_v2", 16)])
def test_32_bits_gives_exactly_the_unquantized_outputs(name, res):
    torch.manual_seed(0)
    reference = create_model(name, 10, 3, [res])
    model = create_model(name, 10, 3, [res])
    model.load_state_dict(reference.state_dict())
    quantize_(model, QuantConfig(weight_bits=32, act_bits=32))
    x = torch.randn(2, 3, res, res)
    for train in (True, False):
        reference.train(train), model.train(train)
        torch.manual_seed(1)  # the same dropout mask for both
        expected = reference(x)
        torch.manual_seed(1)
        assert torch.equal(model(x), expected)


def test_input_sign_follows_relu():
    model = quantize_(create_model("resnet20", 10, 1, [16]), QuantConfig())
    signed = [n for n, m in quant_layers(model).items() if m.act_quantizer.signed]
    assert signed == ["conv1"]  # the network input; everything else comes after a ReLU
    mobile = quantize_(create_model("mobilenet_v2", 10, 3, [16]), QuantConfig())
    layers = quant_layers(mobile)
    assert layers["features.0.0"].act_quantizer.signed
    assert layers["features.2.conv.0.0"].act_quantizer.signed  # fed by a linear bottleneck
    assert not layers["features.2.conv.1.0"].act_quantizer.signed  # after ReLU6
    assert not layers["features.2.conv.2"].act_quantizer.signed
    assert not layers["classifier.1"].act_quantizer.signed


@pytest.mark.parametrize("policy,edge", [("8", (8, 8)), ("fp", (32, 32)), ("same", (4, 4))])
def test_first_conv_and_last_linear_follow_the_policy(policy, edge):
    layers = quant_layers(quantize_(create_model("resnet20", 10, 1, [16]), QuantConfig(first_last=policy)))
    for name, layer in layers.items():
        expected = edge if name in ("conv1", "fc") else (4, 4)
        assert (layer.weight_bits, layer.act_bits) == expected, name
    w2 = quant_layers(quantize_(create_model("resnet20", 10, 1, [16]), QuantConfig(weight_bits=2, act_bits=32)))
    assert (w2["conv1"].weight_bits, w2["conv1"].act_bits) == (8, 32)


def test_bitops_of_resnet18_w4a4_match_the_reference():
    model = quantize_(create_model("resnet18", 1000, 3, [224]), QuantConfig(weight_bits=4, act_bits=4))
    bitops = summarize(model, 224, 3)["bitops"]
    assert bitops == pytest.approx(34.7e9, rel=0.02)  # docs/methods.md §4
    fp = summarize(create_model("resnet18", 1000, 3, [224]), 224, 3)["bitops"]
    assert fp == pytest.approx(1.82e9 * 32 * 32, rel=0.02)


def test_act_per_mode_gives_each_resolution_its_own_input_quantizer():
    model = quantize_(create_model("resnet20", 10, 1, [16, 8]), QuantConfig(act_per_mode=True))
    for name, layer in quant_layers(model).items():
        assert isinstance(layer.act_quantizer, SwitchableQuantizer), name
        assert set(layer.act_quantizer.quantizers) == {"r16", "r8"}
        steps = [q.step for q in layer.act_quantizer.quantizers.values()]
        assert steps[0] is not steps[1]
        assert not isinstance(layer.weight_quantizer, SwitchableQuantizer)
    with pytest.raises(RsqError, match="resolution-switchable"):
        quantize_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), QuantConfig(act_per_mode=True), torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("field,value", [("weight_bits", 1), ("act_bits", 9), ("weight_bits", "four"),
                                         ("act_bits", []), ("quantizer", "dorefa"), ("first_last", "16"),
                                         ("act_per_mode", "yes")])
def test_bad_config_raises_rsq_error(field, value):
    with pytest.raises(RsqError, match=re.escape(repr(value))):
        QuantConfig(**{field: value})


def test_bits_label():
    assert bits_label(QuantConfig()) == "W4A4"
    assert bits_label(QuantConfig(weight_bits=2, act_bits=32)) == "W2A32"
    assert bits_label(QuantConfig(weight_bits=32, act_bits=32)) == "FP"


def test_state_dict_round_trip_keeps_the_learned_steps():
    torch.manual_seed(0)
    model = quantize_(create_model("resnet20", 10, 1, [16]), QuantConfig()).train()
    model(torch.randn(4, 1, 16, 16))  # initialises every step
    other = quantize_(create_model("resnet20", 10, 1, [16]), QuantConfig())
    other.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(model.eval()(x), other.eval()(x))


def separable_data(n=32):
    """Two classes: a bright top half or a bright bottom half, plus noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 1, 8, 8, generator=g) * 0.5
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return x, y


@pytest.mark.parametrize("quantizer", ["lsq", "lqnet"])
def test_quantized_training_reduces_the_loss(quantizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    convert(model, [8, 6])
    quantize_(model, QuantConfig(weight_bits=2, act_bits=2, quantizer=quantizer, first_last="same"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = separable_data()
    small = F.interpolate(x, size=6, mode="bilinear", antialias=True)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(small), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
