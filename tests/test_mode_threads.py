"""The training step's modes side by side on two CPU threads: the same gradients, repeatable."""
import threading

import torch

import rsq
from rsq.config import TrainConfig
from rsq.convert import mode_state
from rsq.mode_threads import ModeThreads
from rsq.train import TrainJob, train_step
from rsq.train_setup import build_training_model


def _batch(n=16, size=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def _job(mode_threads: bool, **overrides):
    x, _ = _batch()
    settings = dict(model="resnet20", resolutions=[20, 16, 12], batch_size=16, lr=0.05, device="cpu",
                    mode_threads=mode_threads)
    config = TrainConfig(**{**settings, **overrides})
    torch.manual_seed(0)
    model = build_training_model(config, 10, 1, x, torch.device("cpu"))
    return TrainJob.create(config, model)


def _grads(job):
    return [p.grad.clone() if p.grad is not None else None for p in job.model.parameters()] + \
        [a.grad.clone() for a in job.ensemble.parameters()]


def _steps(job, n):
    x, y = _batch()
    return [train_step(job, x, y, 0.05) for _ in range(n)]


def test_thread_step_has_the_gradients_of_the_serial_step(two_threads):
    threaded = _job(True)
    assert threaded.mode_threads is not None
    _steps(threaded, 1)
    serial = _job(False)
    assert serial.mode_threads is None
    # The serial step on one intra-op thread: the same kernels as each mode thread runs.
    torch.set_num_threads(1)
    _steps(serial, 1)
    for a, b in zip(_grads(threaded), _grads(serial)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_thread_steps_repeat_exactly_and_match_a_one_thread_pool(two_threads):
    runs = []
    for pool in (2, 2, 1):
        job = _job(True)
        job.mode_threads = ModeThreads(pool)
        stats = _steps(job, 3)
        runs.append((torch.stack(stats), [p.detach().clone() for p in job.model.parameters()]))
    for stats, params in runs[1:]:
        assert torch.equal(stats, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(params, runs[0][1]))


def test_bf16_autocast_reaches_the_mode_threads(two_threads):
    # Autocast is per thread: each mode thread must enter the caller's, or its modes would run in fp32.
    threaded = _job(True, amp="bf16")
    assert threaded.mode_threads is not None
    x, _ = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = threaded.runner(x, threaded.mode_threads)
    assert [t.dtype for t in logits] == [torch.bfloat16] * 3
    with torch.autocast("cpu", dtype=torch.bfloat16):  # and in turn on the calling thread
        assert [t.dtype for t in threaded.runner(x)] == [torch.bfloat16] * 3
    _steps(threaded, 1)
    serial = _job(False, amp="bf16")
    torch.set_num_threads(1)
    _steps(serial, 1)
    # Not bit for bit: in turn, autocast's one cached bf16 copy of a weight gathers every mode's gradient
    # in bf16; side by side each thread has its own copy and the modes' gradients are summed in fp32.
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(_grads(threaded), _grads(serial))
              if a is not None and b.norm() > 0]
    assert len(errors) > 10 and max(errors) < 1e-2  # measured: at most 3e-3


def test_quantized_model_takes_its_first_step_serially_then_threads(two_threads, monkeypatch):
    job = _job(True, weight_bits=4, act_bits=4)
    # rsq train initialises the quantizers on a sample batch; a model that has not is initialised
    # by its first forward, which must then see every mode in turn.
    flags = [b for name, b in job.model.named_buffers() if name.endswith("initialized")]
    assert flags and all(bool(b) for b in flags)
    for b in flags:
        b.fill_(False)
    for module in job.model.modules():
        if hasattr(module, "_ready"):
            module._ready = False
    used = []
    original = ModeThreads.forward
    monkeypatch.setattr(ModeThreads, "forward", lambda self, *a: used.append(1) or original(self, *a))
    _steps(job, 1)
    assert used == []  # quantizer steps are initialised from the first batch, on one thread
    _steps(job, 1)
    assert used == [1]


def test_threads_are_off_where_they_cannot_help_or_apply(two_threads):
    assert _job(False).mode_threads is None
    assert _job(True, compile=True).mode_threads is None
    assert _job(True, resolutions=[20]).mode_threads is None
    # LQ-Nets quantizers refit their shared levels in every training forward: modes must take turns.
    assert _job(True, weight_bits=2, act_bits=2, quantizer="lqnet").mode_threads is None
    assert _job(True, weight_bits=2, act_bits=2).mode_threads is not None
    torch.set_num_threads(1)
    assert _job(True).mode_threads is None


def test_each_thread_has_its_own_mode():
    model = rsq.create_model("resnet20", 10, 1, resolutions=[20, 12]).eval()
    seen, barrier = {}, threading.Barrier(2)

    def run(r):
        with rsq.using_mode(model, r):
            barrier.wait()  # both threads are pinned at once
            out = model(torch.zeros(1, 1, r, r))
            seen[r] = mode_state(model).current.resolution, out.shape

    threads = [threading.Thread(target=run, args=(r,)) for r in (20, 12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {20: (20, (1, 10)), 12: (12, (1, 10))}
    assert mode_state(model).current.resolution == 20  # this thread never switched


def test_the_main_thread_steps_on_one_thread_beside_the_mode_threads_and_evaluates_on_all(two_threads, tmp_path,
                                                                                          monkeypatch):
    import rsq.train

    seen = {"step": [], "eval": []}
    step, evaluate = rsq.train.train_step, rsq.train.evaluate_modes
    monkeypatch.setattr(rsq.train, "train_step", lambda *a, **k: seen["step"].append(torch.get_num_threads())
                        or step(*a, **k))
    monkeypatch.setattr(rsq.train, "evaluate_modes", lambda *a, **k: seen["eval"].append(torch.get_num_threads())
                        or evaluate(*a, **k))
    rsq.train.train(TrainConfig(subset=128, test_subset=64, resolutions=[16, 12], epochs=1, batch_size=64, workers=0,
                                out=str(tmp_path / "run")))
    assert seen["step"] == [1, 1] and seen["eval"] and set(seen["eval"]) == {2}
    assert torch.get_num_threads() == 2
    job = _job(True)
    job.teacher = job.model  # a teacher's forward runs on the main thread: it keeps its threads
    with job.main_thread_for_steps():
        assert torch.get_num_threads() == 2
