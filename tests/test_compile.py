"""`--compile`: one static graph per resolution gives the eager step's loss and gradients.

Inductor's C++ compile takes minutes on 2 cores, so these tests trace with the `aot_eager`
backend: the same Dynamo capture and AOT autograd (where LSQ's gradient scale once failed) without
code generation. The speed of the real thing is in tools/bench_step_speed.py.
"""
import copy

import torch

from rsq.config import TrainConfig
from rsq.train import TrainJob, train, train_step
from rsq.train_setup import build_training_model

RES = [28, 14]
LR = 0.05


def _step(job, x, y):
    """`rsq train`'s step; the loss, and the gradients it left on the parameters (after the SGD step)."""
    stats = train_step(job, x, y, LR)
    return stats[0], {n: p.grad.clone() for n, p in job.model.named_parameters() if p.grad is not None}


def test_compiled_w4a4_step_equals_eager_step(one_thread, monkeypatch):
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, **{**kw, "backend": "aot_eager"}))
    # TrainJob raises Dynamo's cache limit for the per-resolution graphs; put it back afterwards.
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    # The compiled graph runs plain BatchNorm and ReLU (fused_bn stays out of Dynamo), so the eager side
    # does too: with the fused kernel the two would differ by float rounding (about 4e-5 of the loss).
    config = TrainConfig(model="resnet20", resolutions=RES, batch_size=16, lr=LR, weight_bits=4, act_bits=4,
                         channels_last=True, amp="off", device="cpu", distill="full", fused_bn=False)
    torch.manual_seed(0)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    # LSQ step sizes initialise from data, eagerly, before any compile, as in training.
    model = build_training_model(config, 10, 1, x, torch.device("cpu"))
    twin = copy.deepcopy(model)

    eager_loss, eager_grads = _step(TrainJob.create(config, model), x, y)
    torch._dynamo.reset()
    compiled_job = TrainJob.create(config.replace(compile=True), twin)
    assert compiled_job.runner.compiled is not None
    compiled_loss, compiled_grads = _step(compiled_job, x, y)

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
