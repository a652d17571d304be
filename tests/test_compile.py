"""`--compile`: one static graph per resolution gives the eager step's loss and gradients.

Inductor's C++ compile takes minutes on 2 cores, so these tests trace with the `aot_eager`
backend: the same Dynamo capture and AOT autograd (where LSQ's gradient scale once failed) without
code generation. The speed of the real thing is in tools/bench_step_speed.py.
"""
import copy

import torch

import rsq
from rsq.config import TrainConfig
from rsq.distill import EnsembleWeights, mred_loss
from rsq.quantize import QuantConfig, quantize_
from rsq.train import AllResolutions, train

RES = [28, 14]


def _step(runner, model, ensemble, x, y):
    parts = mred_loss(runner(x), y, ensemble, "full")
    model.zero_grad(set_to_none=True)
    parts.total.backward()
    return parts.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_w4a4_step_equals_eager_step(one_thread):
    torch.manual_seed(0)
    model = rsq.create_model("resnet20", 10, 1, resolutions=RES)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
    AllResolutions(model, RES)(x)  # LSQ step sizes initialise from data, eagerly, as in training
    twin = copy.deepcopy(model)
    ensemble = EnsembleWeights(len(RES))

    eager_loss, eager_grads = _step(AllResolutions(model, RES, channels_last=True), model, ensemble, x, y)
    runner = AllResolutions(twin, RES, channels_last=True)
    runner.compiled = torch.compile(twin, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    compiled_loss, compiled_grads = _step(runner, twin, ensemble, x, y)

    assert torch.allclose(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, rtol=1e-3, atol=1e-5), name
    # Every resolution ran its own BN: the running statistics moved in both copies alike.
    for (name, a), (_, b) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), name


def test_train_with_compile_flag_full_precision(one_thread, tmp_path, monkeypatch):
    real_compile = torch.compile
    calls = []

    def traced(model, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", traced)
    torch._dynamo.reset()
    config = TrainConfig(model="resnet20", subset=256, test_subset=256, resolutions=[28, 14], epochs=1,
                         batch_size=64, lr=0.05, seed=0, workers=0, compile=True, out=str(tmp_path / "run"))
    results = train(config)
    assert calls and calls[0].get("dynamic") is False
    assert [row["resolution"] for row in results["rows"]] == [28, 14]
    assert all(row["top1"] > 0 for row in results["rows"])
