"""Switchable BatchNorm semantics (one BN per resolution, chosen by key) and shared weights."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import rsq
from rsq.convert import add_resolution, mode_state, resolutions_of
from rsq.errors import RsqError
from rsq.models import create_model, list_models
from rsq.nn.mode import Mode
from rsq.nn.switchable_bn import SwitchableBatchNorm2d

RES = [28, 20, 12]
KEYS = {f"r{r}" for r in RES}


def _base(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet20", num_classes=10, in_chans=1)


def _converted(resolutions=RES, seed=0):
    return rsq.convert(_base(seed), resolutions)


def _switchables(model):
    return [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]


def _bn_state(model):
    """{(layer index, key, buffer/param name): clone} of every per-resolution BN."""
    state = {}
    for i, sw in enumerate(_switchables(model)):
        for key, bn in sw.bns.items():
            for name, t in list(bn.named_buffers()) + list(bn.named_parameters()):
                state[(i, key, name)] = t.detach().clone()
    return state


def _randomize_bns(model, seed=1):
    """Give every resolution's BN its own, clearly different statistics and affine values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sw in _switchables(model):
            for bn in sw.bns.values():
                c = bn.num_features
                bn.running_mean.copy_(torch.randn(c, generator=g))
                bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g))


def _record_active_keys(model):
    """Forward hooks on every per-resolution BN; returns the list of keys that ran."""
    ran = []
    first = _switchables(model)[0]
    for key, bn in first.bns.items():
        bn.register_forward_hook(lambda mod, inp, out, key=key: ran.append(key))
    return ran


def _plain_with(model, key):
    """A deep copy where every SwitchableBatchNorm2d is replaced by its BN ``key``: the
    network that resolution ``key`` is supposed to compute."""
    plain = copy.deepcopy(model)

    def swap(module):
        for name, child in module.named_children():
            if isinstance(child, SwitchableBatchNorm2d):
                setattr(module, name, child.bns[key])
            else:
                swap(child)

    swap(plain)
    plain._forward_pre_hooks.clear()
    return plain


# ----------------------------------------------------------------------------- structure
def test_convert_gives_one_bn_per_resolution():
    base = _base()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in base.modules())
    originals = [copy.deepcopy(m) for m in base.modules() if isinstance(m, nn.BatchNorm2d)]
    model = rsq.convert(base, RES)
    switchables = _switchables(model)
    assert len(switchables) == n_bn > 0
    # no BatchNorm2d is left outside a switchable layer
    inside = {id(bn) for sw in switchables for bn in sw.bns.values()}
    loose = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and id(m) not in inside]
    assert loose == []
    for sw, original in zip(switchables, originals):
        assert set(sw.bns.keys()) == KEYS
        bns = list(sw.bns.values())
        # distinct modules and distinct tensors per resolution
        assert len({id(bn) for bn in bns}) == len(RES)
        assert len({id(bn.weight) for bn in bns}) == len(RES)
        assert len({bn.running_mean.data_ptr() for bn in bns}) == len(RES)
        for bn in bns:  # each starts as a copy of the original BN
            assert torch.equal(bn.weight, original.weight) and torch.equal(bn.bias, original.bias)
            assert torch.equal(bn.running_mean, original.running_mean)
            assert torch.equal(bn.running_var, original.running_var)
            assert bn.eps == original.eps and bn.momentum == original.momentum
    assert resolutions_of(model) == sorted(RES, reverse=True)


def test_train_forward_updates_only_its_own_resolution():
    model = _converted().train()
    for r in RES:
        before = _bn_state(model)
        model(torch.randn(4, 1, r, r))
        after = _bn_state(model)
        changed_keys = set()
        for k, v in before.items():
            if not torch.equal(v, after[k]):
                changed_keys.add(k[1])
        assert changed_keys == {f"r{r}"}, (r, changed_keys)
        # the stats of r really moved, in every layer, and its counter counted one batch
        for i, sw in enumerate(_switchables(model)):
            assert not torch.equal(before[(i, f"r{r}", "running_mean")], after[(i, f"r{r}", "running_mean")])
            assert after[(i, f"r{r}", "num_batches_tracked")].item() == before[(i, f"r{r}", "num_batches_tracked")].item() + 1


def test_active_bn_follows_input_size():
    model = _converted().eval()
    _randomize_bns(model)
    ran = _record_active_keys(model)
    for r in [12, 28, 20, 20, 12]:
        ran.clear()
        model(torch.randn(2, 1, r, r))
        assert ran == [f"r{r}"]


@pytest.mark.parametrize("r", RES)
def test_output_equals_plain_network_with_that_resolutions_bn(r):
    model = _converted().eval()
    _randomize_bns(model)
    x = torch.randn(3, 1, r, r)
    expected = _plain_with(model, f"r{r}").eval()(x)
    out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # and the other resolutions' BNs would give something else (the test is not vacuous)
    other = next(k for k in KEYS if k != f"r{r}")
    assert not torch.allclose(_plain_with(model, other).eval()(x), out)


def test_set_mode_and_using_mode_pin_the_bn():
    model = _converted().eval()
    ran = _record_active_keys(model)
    x28 = torch.randn(2, 1, 28, 28)

    rsq.set_mode(model, 12)
    ran.clear()
    model(x28)
    assert ran == ["r12"]
    rsq.set_mode(model, None)  # follow the input again
    ran.clear()
    model(x28)
    assert ran == ["r28"]

    rsq.set_mode(model, 20)
    with rsq.using_mode(model, 12):
        ran.clear()
        model(x28)
        assert ran == ["r12"]
    ran.clear()
    model(x28)
    assert ran == ["r20"], "using_mode must restore the previous pin"
    rsq.set_mode(model, None)

    with rsq.using_mode(model, 20):
        pass
    ran.clear()
    model(torch.randn(2, 1, 12, 12))
    assert ran == ["r12"], "after using_mode the model follows the input size again"


def test_using_mode_restores_pin_after_an_exception():
    model = _converted().eval()
    ran = _record_active_keys(model)
    with pytest.raises(ValueError):
        with rsq.using_mode(model, 12):
            raise ValueError("boom")
    ran.clear()
    model(torch.randn(1, 1, 20, 20))
    assert ran == ["r20"]


def test_unknown_resolution_raises_with_known_ones():
    model = _converted()
    with pytest.raises(RsqError) as info:
        model(torch.randn(2, 1, 16, 16))
    message = str(info.value)
    assert "16" in message
    for r in RES:
        assert str(r) in message
    with pytest.raises(RsqError, match="28"):
        rsq.set_mode(model, 16)
    with pytest.raises(RsqError):
        with rsq.using_mode(model, 99):
            pass
    # a Mode object is checked as a whole: a known resolution at bits the model lacks is refused
    # at once, not with a KeyError at the next forward
    with pytest.raises(RsqError):
        rsq.set_mode(model, Mode(28, bits=4))
    rsq.set_mode(model, Mode(28))
    assert mode_state(model).pinned == Mode(28)


def test_non_square_input_needs_a_pinned_mode():
    model = _converted().eval()
    x = torch.randn(2, 1, 28, 20)
    with pytest.raises(RsqError, match="square"):
        model(x)
    ran = _record_active_keys(model)
    with rsq.using_mode(model, 20):
        out = model(x)
    assert out.shape == (2, 10)
    assert ran == ["r20"]


def test_convert_twice_and_bad_arguments_error():
    model = _converted()
    with pytest.raises(RsqError):
        rsq.convert(model, RES)
    with pytest.raises(RsqError):
        rsq.convert(model, [32])
    for bad in ([], [28, 28], [0], [-12], [28.0], [True]):
        with pytest.raises(RsqError):
            rsq.convert(_base(), bad)
    with pytest.raises(RsqError):
        rsq.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), RES)  # no BN to switch
    with pytest.raises(RsqError):
        mode_state(_base())  # not converted


def test_bn_chosen_by_key_not_list_position():
    """Converting with the resolutions in another order gives the same key -> BN mapping."""
    a = _converted([28, 20, 12])
    b = _converted([12, 28, 20])
    assert resolutions_of(b) == [28, 20, 12]
    assert set(a.state_dict()) == set(b.state_dict())
    assert any(".bns.r20." in k for k in a.state_dict())
    _randomize_bns(a)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    for r in RES:
        x = torch.randn(2, 1, r, r)
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        # explicit pinning by value agrees with the size-driven choice
        with rsq.using_mode(b, r):
            torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # the BN named r20 is the one used at 20 px, whatever the position
    for sa, sb in zip(_switchables(a), _switchables(b)):
        for key in KEYS:
            assert torch.equal(sa.bns[key].running_mean, sb.bns[key].running_mean)


def test_add_resolution_copies_nearest_and_is_independent():
    model = _converted([28, 20, 12]).eval()
    _randomize_bns(model)
    (mode,) = add_resolution(model, 26)  # one new mode: this model switches resolution only
    assert mode.resolution == 26 and mode.bits is None
    assert resolutions_of(model) == [28, 26, 20, 12]
    for sw in _switchables(model):
        assert torch.equal(sw.bns["r26"].running_mean, sw.bns["r28"].running_mean)
        assert sw.bns["r26"] is not sw.bns["r28"]
        assert sw.bns["r26"].weight is not sw.bns["r28"].weight
    model.train()
    before = _bn_state(model)
    model(torch.randn(4, 1, 26, 26))
    after = _bn_state(model)
    assert {k[1] for k, v in before.items() if not torch.equal(v, after[k])} == {"r26"}
    with pytest.raises(RsqError):
        add_resolution(model, 20)


# ----------------------------------------------------------------------------- shared weights
def test_conv_and_linear_parameters_are_shared_objects():
    base = _base()
    shared_before = {id(p) for m in base.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     for p in m.parameters(recurse=False)}
    model = rsq.convert(base, RES)
    shared_after = {id(p) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                    for p in m.parameters(recurse=False)}
    assert shared_before == shared_after
    # every parameter is either shared (conv/linear) or belongs to exactly one resolution's BN
    bn_params = {id(p) for sw in _switchables(model) for p in sw.parameters()}
    assert {id(p) for p in model.parameters()} == shared_after | bn_params
    assert not shared_after & bn_params


def test_gradients_from_two_resolutions_accumulate_in_one_tensor():
    model = _converted().train()
    torch.manual_seed(3)
    x28 = torch.randn(4, 1, 28, 28)
    x12 = torch.randn(4, 1, 12, 12)
    y = torch.tensor([0, 1, 2, 3])
    loss = nn.CrossEntropyLoss()
    shared = [model.conv1.weight, model.layer2[0].conv1.weight, model.fc.weight, model.fc.bias]

    def grads(*inputs):
        model.zero_grad(set_to_none=True)
        total = sum(loss(model(x), y) for x in inputs)
        total.backward()
        return [p.grad.clone() for p in shared]

    g28, g12, both = grads(x28), grads(x12), grads(x28, x12)
    for a, b, c in zip(g28, g12, both):
        assert a.abs().sum() > 0 and b.abs().sum() > 0
        assert not torch.allclose(a, b)
        torch.testing.assert_close(c, a + b, rtol=1e-4, atol=1e-6)
    # a BN only receives gradients from its own resolution
    model.zero_grad(set_to_none=True)
    loss(model(x12), y).backward()
    sw = _switchables(model)[0]
    assert sw.bns["r12"].weight.grad is not None and sw.bns["r12"].weight.grad.abs().sum() > 0
    assert sw.bns["r28"].weight.grad is None and sw.bns["r20"].weight.grad is None


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2"])
def test_parameter_count_of_converted_torchvision_models(name):
    resolutions = [224, 192, 160, 128, 96]
    reference = getattr(torchvision.models, name)()
    ref_count = sum(p.numel() for p in reference.parameters())
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in reference.modules()
                    if isinstance(m, nn.BatchNorm2d))
    assert bn_affine > 0
    model = create_model(name, resolutions=resolutions)
    expected = ref_count + (len(resolutions) - 1) * bn_affine
    assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in model.parameters()) == expected
    unconverted = create_model(name)
    assert sum(p.numel() for p in unconverted.parameters()) == ref_count


@pytest.mark.parametrize("name", list_models())
def test_every_model_accepts_one_channel_input(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=1, resolutions=[32, 24])
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    model.train()
    for r in (32, 24):
        out = model(torch.randn(2, 1, r, r))
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 32, 32))
