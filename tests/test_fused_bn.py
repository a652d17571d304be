"""BatchNorm + ReLU (+ a block's add) as one C kernel: BatchNorm's math; the plain modules wherever it does not
apply."""
import copy

import pytest
import torch

import rsq
from rsq.config import TrainConfig
from rsq.nn import fused_bn
from rsq.train import AMX_HINT, TrainJob, suggests_bf16, train, train_step
from rsq.train_setup import build_training_model

pytestmark = pytest.mark.skipif(fused_bn.library() is None, reason="no C compiler to build the fused kernel")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    fused_bn.set_enabled(True)


def _case(residual: bool, channels=16, size=9, channels_last=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(-1.5, 1.5, generator=g)  # negative gains too
        bn.bias.normal_(0, 0.5, generator=g)
    layout = torch.channels_last if channels_last else torch.contiguous_format

    def tensor():
        return (torch.randn(24, channels, size, size, generator=g) * 2 + 0.3).contiguous(memory_format=layout)
    return bn, tensor().requires_grad_(), tensor().requires_grad_() if residual else None, tensor()


def _run(bn, x, r, grad, fused: bool, relu=None):
    fused_bn.set_enabled(fused)
    calls = []
    original = fused_bn._BatchNormReLU.apply
    fused_bn._BatchNormReLU.apply = lambda *a: calls.append(1) or original(*a)
    try:
        x, r = x.detach().clone().requires_grad_(), None if r is None else r.detach().clone().requires_grad_()
        y = fused_bn.bn_relu(bn, x, torch.nn.ReLU(inplace=True) if relu is None else relu, r)
        y.backward(grad)
    finally:
        fused_bn._BatchNormReLU.apply = original
        fused_bn.set_enabled(True)
    grads = [x.grad, bn.weight.grad, bn.bias.grad] + ([] if r is None else [r.grad])
    return y.detach(), grads, bool(calls)


@pytest.mark.parametrize("residual", [False, True])
def test_fused_equals_batchnorm_then_relu(one_thread, residual):
    bn, x, r, grad = _case(residual)
    plain_bn = copy.deepcopy(bn)
    y, grads, used = _run(bn, x, r, grad, fused=True)
    y_ref, grads_ref, used_ref = _run(plain_bn, x, r, grad, fused=False)
    assert used and not used_ref
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bn, name), getattr(plain_bn, name), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == int(plain_bn.num_batches_tracked) == 1


def test_fused_gradient_is_the_derivative(one_thread):
    # Against finite differences in float64 of the plain modules (the kernel itself is float32).
    bn, x, _, _ = _case(False, channels=4, size=3)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))

    def loss(t):
        out = torch.relu(torch.nn.functional.batch_norm(t, None, None, bn.weight.double(), bn.bias.double(),
                                                        training=True, eps=bn.eps))
        return (out * weights.double()).sum()
    x64 = x.detach().double().requires_grad_()
    loss(x64).backward()
    _, grads, used = _run(bn, x, None, weights.contiguous(memory_format=torch.channels_last), fused=True)
    assert used
    torch.testing.assert_close(grads[0].double(), x64.grad, rtol=1e-3, atol=1e-4)


def test_the_plain_modules_run_wherever_the_kernel_does_not_apply(one_thread):
    bn, x, _, grad = _case(False, channels_last=False)
    assert not _run(bn, x, None, grad, fused=True)[2]  # NCHW
    bn, x, _, grad = _case(False)
    assert not _run(bn.eval(), x, None, grad, fused=True)[2]  # running statistics
    bn.train()
    torch.set_num_threads(2)
    assert not _run(bn, x, None, grad, fused=True)[2]  # the kernel is serial: ATen's parallel one is faster
    torch.set_num_threads(1)
    assert not _run(bn.double(), x.double(), None, grad.double(), fused=True)[2]  # float32 only
    bn, x, r, grad = _case(True)
    assert not _run(bn, x, r.detach().contiguous(), grad, fused=True)[2]  # residual in another layout
    assert _run(bn, x, r, grad, fused=True)[2]
    # An activation swapped in for the ReLU is what runs, never the kernel's max(., 0).
    y, _, used = _run(bn, x, r, grad, fused=True, relu=torch.nn.ReLU6())
    assert not used and float(y.max()) <= 6.0
    expected = torch.nn.functional.relu6(torch.nn.functional.batch_norm(
        x.detach(), None, None, bn.weight.detach(), bn.bias.detach(), training=True, eps=bn.eps) + r.detach())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_no_compiler_means_the_plain_modules(one_thread, monkeypatch, tmp_path):
    monkeypatch.setitem(fused_bn._state, "library", None)
    monkeypatch.setattr("rsq.runtime.native.find_compiler", lambda: None)
    bn, x, _, grad = _case(False)
    assert not _run(bn, x, None, grad, fused=True)[2]
    assert fused_bn._state["library"] is False


def test_export_traces_the_plain_modules():
    # torch.fx (rsq's integer lowering) and torch.export (PT2E) see relu(bn(x)), never the kernel.
    model = rsq.create_model("resnet20", 10, 1, resolutions=[12]).train()
    graph = torch.fx.symbolic_trace(model).graph
    modules = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    assert {"relu", "layer1.0.relu", "layer1.0.bn1.bns.r12", "layer1.0.bn2.bns.r12"} <= modules
    assert not any("BatchNormReLU" in str(n.target) for n in graph.nodes)


def test_training_steps_with_and_without_the_kernel_agree(one_thread, monkeypatch):
    calls = []
    original = fused_bn._BatchNormReLU.apply
    monkeypatch.setattr(fused_bn._BatchNormReLU, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for fused in (True, False):
        config = TrainConfig(model="resnet20", resolutions=[16, 12], batch_size=16, lr=0.05, device="cpu",
                             fused_bn=fused)
        torch.manual_seed(0)
        job = TrainJob.create(config, build_training_model(config, 10, 1, x, torch.device("cpu")))
        assert fused_bn.enabled() is fused
        losses.append([train_step(job, x, y, 0.05)])
        grads.append([p.grad.clone() for p in job.model.parameters()])  # of the first step
        losses[-1] += [train_step(job, x, y, 0.05) for _ in range(2)]
    assert len(calls) == 3 * 2 * 19  # steps x resolutions x (the stem, and two in each of 9 blocks)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    # Later steps drift apart by float rounding only (three steps at a small batch amplify it).
    torch.testing.assert_close(torch.stack(losses[0]), torch.stack(losses[1]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("residual", [False, True])
def test_a_nan_passes_through_as_in_relu(one_thread, residual):
    # torch.relu keeps NaN; a kernel that zeroed it would hide a diverging run behind a finite loss.
    bn, x, r, grad = _case(residual)
    with torch.no_grad():
        x[3, 5, 2, 2] = float("nan")
    y_plain, grads_plain, _ = _run(bn, x, r, grad, fused=False)
    y_fused, grads_fused, used = _run(bn, x, r, grad, fused=True)
    assert used and torch.isnan(y_fused[:, 5]).all() and not torch.isnan(y_fused[:, 4]).any()
    assert torch.equal(torch.isnan(y_fused), torch.isnan(y_plain))
    for fused, plain in zip(grads_fused, grads_plain):
        assert torch.equal(torch.isnan(fused), torch.isnan(plain))


def test_a_cpu_run_says_whether_its_step_uses_the_kernel(monkeypatch, tmp_path, capsys):
    x = torch.randn(8, 1, 16, 16)

    def described(threads: int, **settings) -> str:
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        config = TrainConfig(**{"model": "resnet20", "resolutions": [16, 12], "batch_size": 8, "device": "cpu",
                                **settings})
        job = TrainJob.create(config, build_training_model(config, 10, 1, x, torch.device("cpu")))
        try:
            return job.describe_cpu_step()
        finally:
            fused_bn.set_enabled(True)

    assert described(2) == "2 modes side by side on 2 threads, channels_last, fused BatchNorm + ReLU kernel"
    assert described(1, mode_threads=False) == ("2 modes in turn on 1 thread(s), channels_last, "
                                                "fused BatchNorm + ReLU kernel")
    assert "not used (it needs channels_last" in described(2, mode_threads=False)
    assert "not used (it needs channels_last" in described(2, channels_last=False)
    assert described(2, fused_bn=False).endswith("fused BatchNorm + ReLU off (--no-fused-bn)")
    assert described(2, compile=True).endswith("torch.compile (plain BatchNorm and ReLU in the graph)")
    assert described(2, amp="bf16") == "2 modes side by side on 2 threads, channels_last, bf16 autocast"
    assert described(2, model="resnet18").endswith("fused BatchNorm + ReLU not used by this model")
    monkeypatch.setitem(fused_bn._state, "library", None)
    monkeypatch.setattr("rsq.runtime.native.find_compiler", lambda: None)  # a machine without a C compiler
    assert "unavailable: no C compiler found (install gcc or set CC)" in described(2)
    monkeypatch.setitem(fused_bn._state, "library", None)
    monkeypatch.setattr("rsq.runtime.native.find_compiler", lambda: "cc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a file, not a folder"))
    (tmp_path / "a file, not a folder").write_text("")
    assert "cc could not build it into" in described(2)
    monkeypatch.undo()

    # `rsq train` prints it when the run starts, and on a CPU with AMX how to run it in bf16.
    monkeypatch.setattr("rsq.train.has_amx_bf16", lambda: True)
    for amp in ("off", "bf16"):
        train(TrainConfig(model="resnet20", subset=64, test_subset=64, resolutions=[16, 12], epochs=1, batch_size=32,
                          workers=0, amp=amp, out=str(tmp_path / f"run_{amp}")))
        lines = capsys.readouterr().out.splitlines()
        assert any(line.startswith("step: 2 mode") for line in lines)
        assert (AMX_HINT in lines) == (amp == "off")
    # Quantized runs gained less from bf16 and their bf16 accuracy is unmeasured: no hint.
    assert suggests_bf16(TrainConfig()) and not suggests_bf16(TrainConfig(weight_bits=4, act_bits=4))
    assert not suggests_bf16(TrainConfig(bit_widths=[4, 32]))
