"""MRED (docs/methods.md §1) against a plain-math oracle written here, not via rsq.distill."""
import math

import pytest
import torch

import rsq
from rsq.config import TrainConfig
from rsq.distill import EnsembleWeights, kd_loss, mred_loss
from rsq.train import TrainJob, param_groups, train_step

# Three resolutions (largest first), batch of 2, 3 classes.
LOGITS3 = [
    [[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]],
    [[1.0, 1.5, -0.5], [-1.0, 0.0, 2.0]],
    [[0.3, -0.7, 0.9], [2.5, -1.5, 0.0]],
]
TARGET = [0, 2]
REL = 1e-5  # mred_loss computes in float32


# ----------------------------------------------------------------------------- the oracle
def softmax(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def ce(z, y):
    """mean_b -log softmax(z_b)[y_b]"""
    return sum(-math.log(softmax(row)[t]) for row, t in zip(z, y)) / len(z)


def ce_smoothed(z, y, eps):
    total = 0.0
    for row, t in zip(z, y):
        p = softmax(row)
        c = len(row)
        total += sum(-((1 - eps) * (k == t) + eps / c) * math.log(p[k]) for k in range(c))
    return total / len(z)


def kd(t, s):
    """KL(softmax(t) || softmax(s)), mean over the batch."""
    total = 0.0
    for tr, sr in zip(t, s):
        pt, ps = softmax(tr), softmax(sr)
        total += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
    return total / len(t)


def ensemble(logits, alpha):
    w = softmax(alpha)
    batch, classes = len(logits[0]), len(logits[0][0])
    return [[sum(w[j] * logits[j][b][c] for j in range(len(logits))) for c in range(classes)]
            for b in range(batch)]


def oracle(logits, y, alpha, mode):
    n = len(logits)
    l_ce = sum(ce(z, y) for z in logits)
    if mode == "none":
        return l_ce, 0.0, 0.0
    z_ens = ensemble(logits, alpha)
    l_ens = ce(z_ens, y)
    l_kd = sum(kd(z_ens, z) for z in logits)
    if mode == "full":
        pairs = [(k, j) for j in range(n) for k in range(j)]
        assert len(pairs) + n == n * (n + 1) // 2
        l_kd = 2.0 / (n + 1) * (l_kd + sum(kd(logits[k], logits[j]) for k, j in pairs))
    return l_ce, l_ens, l_kd


def _tensors(logits):
    return [torch.tensor(z, dtype=torch.float32, requires_grad=True) for z in logits]


def _ensemble(n, alpha=None):
    ens = EnsembleWeights(n)
    if alpha is not None:
        with torch.no_grad():
            ens.alpha.copy_(torch.tensor(alpha, dtype=torch.float32))
    return ens


# ----------------------------------------------------------------------------- values
def test_oracle_itself_on_a_case_worked_by_hand():
    # Equal logits: every CE is log 3, every KD is 0.
    z = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert ce(z, [0, 2]) == pytest.approx(math.log(3))
    assert kd(z, z) == pytest.approx(0.0, abs=1e-15)
    # One sample, two classes: KL([0.5,0.5] || softmax([0, log 3]) = [1/4, 3/4])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kd([[0.0, 0.0]], [[0.0, math.log(3)]]) == pytest.approx(expected)


def test_equal_logits_give_n_log_c_and_zero_kd():
    logits = [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]] * 3
    parts = mred_loss(_tensors(logits), torch.tensor(TARGET), _ensemble(3), "full")
    assert parts.ce.item() == pytest.approx(3 * math.log(3), rel=REL)
    assert parts.ens.item() == pytest.approx(math.log(3), rel=REL)
    assert parts.kd.item() == pytest.approx(0.0, abs=1e-7)


def test_alpha_initialised_to_ones_and_never_weight_decayed():
    ens = EnsembleWeights(5)
    assert torch.equal(ens.alpha.detach(), torch.ones(5))
    torch.testing.assert_close(ens.weights(), torch.full((5,), 0.2))
    groups = param_groups([torch.nn.Linear(2, 2), ens], weight_decay=0.1)
    no_decay = [g for g in groups if g["weight_decay"] == 0.0]
    assert any(p is ens.alpha for g in no_decay for p in g["params"])
    assert not any(p is ens.alpha for g in groups if g["weight_decay"] > 0 for p in g["params"])


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("mode", ["full", "vanilla", "none"])
@pytest.mark.parametrize("alpha", [None, [0.7, -0.4, 0.2]])
def test_loss_parts_match_the_oracle(n, mode, alpha):
    logits = LOGITS3[:n]
    a = [1.0] * n if alpha is None else alpha[:n]
    want_ce, want_ens, want_kd = oracle(logits, TARGET, a, mode)
    parts = mred_loss(_tensors(logits), torch.tensor(TARGET), _ensemble(n, None if alpha is None else a), mode)
    assert parts.ce.item() == pytest.approx(want_ce, rel=REL)
    assert parts.ens.item() == pytest.approx(want_ens, rel=REL, abs=1e-7)
    assert parts.kd.item() == pytest.approx(want_kd, rel=REL, abs=1e-7)
    assert parts.total.item() == pytest.approx(want_ce + want_ens + want_kd, rel=REL)
    if mode != "none":
        assert want_kd > 0.01 and want_ens > 0.01  # the example exercises every term


def test_full_and_vanilla_differ_as_the_formula_says():
    n = 3
    pairs = sum(kd(LOGITS3[k], LOGITS3[j]) for j in range(n) for k in range(j))
    vanilla = mred_loss(_tensors(LOGITS3), torch.tensor(TARGET), _ensemble(n), "vanilla").kd.item()
    full = mred_loss(_tensors(LOGITS3), torch.tensor(TARGET), _ensemble(n), "full").kd.item()
    assert full == pytest.approx(2.0 / (n + 1) * (vanilla + pairs), rel=REL)
    assert full != pytest.approx(vanilla + pairs, rel=1e-3)


def test_mode_none_is_the_plain_sum_of_cross_entropies():
    logits = _tensors(LOGITS3)
    ens = _ensemble(3)
    parts = mred_loss(logits, torch.tensor(TARGET), ens, "none")
    assert parts.total.item() == pytest.approx(sum(ce(z, TARGET) for z in LOGITS3), rel=REL)
    assert parts.ens.item() == 0.0 and parts.kd.item() == 0.0
    parts.total.backward()
    assert ens.alpha.grad is None or torch.all(ens.alpha.grad == 0)


def test_label_smoothing_applies_to_the_resolution_cross_entropies():
    parts = mred_loss(_tensors(LOGITS3), torch.tensor(TARGET), _ensemble(3), "full", label_smoothing=0.1)
    assert parts.ce.item() == pytest.approx(sum(ce_smoothed(z, TARGET, 0.1) for z in LOGITS3), rel=REL)
    assert parts.ens.item() == pytest.approx(oracle(LOGITS3, TARGET, [1.0] * 3, "full")[1], rel=REL)


def test_external_teacher_adds_one_kd_per_resolution():
    teachers = [[[0.5, 0.0, -0.5], [0.0, 0.0, 1.0]], [[1.0, -1.0, 0.0], [0.2, 0.1, 0.0]]]
    logits = LOGITS3[:2]
    base = oracle(logits, TARGET, [1.0, 1.0], "full")[2]
    extra = sum(kd(t, z) for t, z in zip(teachers, logits))
    t = [torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in teachers]
    parts = mred_loss(_tensors(logits), torch.tensor(TARGET), _ensemble(2), "full", teacher_logits=t)
    assert parts.kd.item() == pytest.approx(base + extra, rel=REL)
    parts.total.backward()
    assert all(v.grad is None for v in t)


# ----------------------------------------------------------------------------- gradients
def _grad_softmax_ce(z, y):
    """d CE / d z = (softmax(z) - onehot) / B."""
    return [[(p - (c == t)) / len(z) for c, p in enumerate(softmax(row))] for row, t in zip(z, y)]


def _grad_kd_student(t, s):
    """d KL(p_t || p_s) / d s = (p_s - p_t) / B, the teacher held constant."""
    return [[(ps - pt) / len(s) for ps, pt in zip(softmax(sr), softmax(tr))] for tr, sr in zip(t, s)]


def _add(a, b, scale=1.0):
    return [[x + scale * y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


@pytest.mark.parametrize("mode", ["full", "vanilla"])
def test_logit_gradients_treat_every_teacher_as_a_constant(mode):
    """grad z_j = CE'(z_j) + factor * [KD'(ens -> z_j) + sum_{k<j} KD'(z_k -> z_j)]: no gradient
    flows into a logit through the ensemble or through its role as a teacher."""
    n = 3
    alpha = [0.7, -0.4, 0.2]
    z_ens = ensemble(LOGITS3, alpha)
    factor = 2.0 / (n + 1) if mode == "full" else 1.0
    logits = _tensors(LOGITS3)
    parts = mred_loss(logits, torch.tensor(TARGET), _ensemble(n, alpha), mode)
    parts.total.backward()
    for j in range(n):
        kd_grad = _grad_kd_student(z_ens, LOGITS3[j])
        if mode == "full":
            for k in range(j):
                kd_grad = _add(kd_grad, _grad_kd_student(LOGITS3[k], LOGITS3[j]))
        want = _add(_grad_softmax_ce(LOGITS3[j], TARGET), kd_grad, factor)
        torch.testing.assert_close(logits[j].grad, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-7)


def test_ensemble_ce_gradient_reaches_alpha_only():
    n = 3
    alpha = [0.7, -0.4, 0.2]
    logits = _tensors(LOGITS3)
    ens = _ensemble(n, alpha)
    parts = mred_loss(logits, torch.tensor(TARGET), ens, "full")
    parts.total.backward()
    # alpha's gradient is that of L_ens alone (KD's teacher is detached), by central differences
    h = 1e-6
    numeric = []
    for i in range(n):
        up, down = list(alpha), list(alpha)
        up[i] += h
        down[i] -= h
        numeric.append((ce(ensemble(LOGITS3, up), TARGET) - ce(ensemble(LOGITS3, down), TARGET)) / (2 * h))
    torch.testing.assert_close(ens.alpha.grad, torch.tensor(numeric, dtype=torch.float32), rtol=1e-3, atol=1e-6)
    assert ens.alpha.grad.abs().sum() > 1e-3

    # The ensemble itself carries no gradient to the logits.
    logits = _tensors(LOGITS3)
    ens = _ensemble(n, alpha)
    loss = torch.nn.functional.cross_entropy(ens.ensemble(logits), torch.tensor(TARGET))
    loss.backward()
    assert all(z.grad is None or torch.all(z.grad == 0) for z in logits)
    assert ens.alpha.grad.abs().sum() > 0


def test_kd_loss_gives_no_gradient_to_the_teacher():
    t = torch.tensor(LOGITS3[0], dtype=torch.float32, requires_grad=True)
    s = torch.tensor(LOGITS3[1], dtype=torch.float32, requires_grad=True)
    value = kd_loss(t, s)
    assert value.item() == pytest.approx(kd(LOGITS3[0], LOGITS3[1]), rel=REL)
    value.backward()
    assert t.grad is None
    torch.testing.assert_close(s.grad, torch.tensor(_grad_kd_student(LOGITS3[0], LOGITS3[1]), dtype=torch.float32))


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_distill_temperature_is_kl_of_softened_logits_times_t_squared(temperature):
    """Every MRED KD term at T is T^2 KL(softmax(t/T) || softmax(s/T)); its gradient on the student
    is T (p_s - p_t) / B at the softened distributions; CE and the ensemble's loss are unchanged."""
    div = lambda z: [[v / temperature for v in row] for row in z]  # noqa: E731
    n, alpha = 3, [0.0, 0.0, 0.0]
    z_ens = ensemble(LOGITS3, alpha)
    pairs = [(k, j) for j in range(n) for k in range(j)]
    expected = 2.0 / (n + 1) * temperature**2 * (sum(kd(div(z_ens), div(z)) for z in LOGITS3)
                                                 + sum(kd(div(LOGITS3[k]), div(LOGITS3[j])) for k, j in pairs))
    plain = mred_loss(_tensors(LOGITS3), torch.tensor(TARGET), _ensemble(n), "full")
    soft = mred_loss(_tensors(LOGITS3), torch.tensor(TARGET), _ensemble(n), "full", temperature=temperature)
    assert soft.kd.item() == pytest.approx(expected, rel=REL)
    assert soft.kd.item() != pytest.approx(plain.kd.item(), rel=1e-3)
    assert (soft.ce.item(), soft.ens.item()) == (plain.ce.item(), plain.ens.item())
    s = torch.tensor(LOGITS3[1], dtype=torch.float32, requires_grad=True)
    kd_loss(torch.tensor(LOGITS3[0]), s, temperature).backward()
    grad = [[temperature * g for g in row] for row in _grad_kd_student(div(LOGITS3[0]), div(LOGITS3[1]))]
    torch.testing.assert_close(s.grad, torch.tensor(grad, dtype=torch.float32))


def test_kd_weight_scales_mred_kd_only():
    """The ramp's weight multiplies MRED's KD; the cross-entropies, the ensemble's loss (alpha) and
    an external teacher's KD keep weight 1."""
    g = torch.Generator().manual_seed(5)
    logits = [torch.randn(6, 4, generator=g) for _ in range(3)]
    target = torch.randint(0, 4, (6,), generator=g)
    teacher = [torch.randn(6, 4, generator=g) for _ in range(3)]
    ensemble = EnsembleWeights(3)
    full = mred_loss(logits, target, ensemble, "full")
    half = mred_loss(logits, target, ensemble, "full", kd_weight=0.5)
    assert half.kd.item() == pytest.approx(0.5 * full.kd.item(), rel=1e-6)
    assert (half.ce.item(), half.ens.item()) == (full.ce.item(), full.ens.item())
    off = mred_loss(logits, target, ensemble, "full", teacher_logits=teacher, kd_weight=0.0)
    external = sum(kd_loss(t, z) for t, z in zip(teacher, logits))
    assert off.kd.item() == pytest.approx(external.item(), rel=1e-6)
    assert off.total.item() == pytest.approx((full.ce + full.ens + external).item(), rel=1e-6)


def test_distill_ramp_rises_linearly_then_holds():
    from rsq.config import TrainConfig
    from rsq.train import distill_weight_at

    config = TrainConfig(distill_ramp=0.5, distill_weight=2.0)
    assert [distill_weight_at(t, 100, config) for t in (0, 25, 49, 50, 99)] == [0.0, 1.0, 1.96, 2.0, 2.0]
    paper = TrainConfig(distill_ramp=0.0)
    assert distill_weight_at(0, 100, paper) == 1.0
    assert TrainConfig().distill_ramp == 0.5  # the default recipe ramps; fashion_mnist_paper does not


@pytest.mark.parametrize("conv_decay, factor, resolutions, scale", [
    ("sum", 1.0, [20, 16, 12], 3.0), ("sum", 2.0, [20, 16, 12], 6.0), ("single", 1.0, [20, 16, 12], None),
    ("single", 2.0, [20, 16, 12], None), ("sum", 1.0, [20], None), ("sum", 2.0, [20], None)])
def test_conv_decay_sum_scales_the_convolutions_decay_by_the_number_of_modes(conv_decay, factor, resolutions, scale):
    config = TrainConfig(model="resnet20", resolutions=resolutions, batch_size=8, lr=0.05, device="cpu",
                         conv_decay=conv_decay, conv_decay_factor=factor, norm_lr_factor=1.0)
    model = rsq.create_model("resnet20", 10, 1, resolutions=resolutions)
    job = TrainJob.create(config, model)
    decay = {id(p): group["weight_decay"] for group in job.optimizer.param_groups for p in group["params"]}
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 21 and all(decay[id(w)] == pytest.approx(config.weight_decay * (scale or 1.0)) for w in convs)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert decay[id(bn.weight)] == config.weight_decay  # private to a mode: one model's gradient, one model's decay
    assert decay[id(model.fc.weight)] == config.weight_decay
    if scale is None:  # a single mode, or single: the param groups of a plain run
        assert len(job.optimizer.param_groups) == (2 if len(resolutions) == 1 else 3)
    quantized = TrainJob.create(config.replace(weight_bits=4, act_bits=4), rsq.quantize_(
        rsq.create_model("resnet20", 10, 1, resolutions=resolutions), rsq.QuantConfig(weight_bits=4, act_bits=4)))
    assert len(quantized.optimizer.param_groups) == (2 if len(resolutions) == 1 else 3)  # a weight's scale is not free
    # one step: SGD applies each group's decay (a conv weight with zero gradient shrinks by lr * decay)
    g = torch.Generator().manual_seed(0)
    conv = model.layer3[2].conv2.weight
    before = conv.detach().clone()
    train_step(job, torch.randn(8, 1, 20, 20, generator=g), torch.randint(0, 10, (8,), generator=g), 0.05)
    moved = before - conv.detach()
    expected_decay = 0.05 * config.weight_decay * (scale or 1.0) * before
    assert torch.allclose(moved - 0.05 * conv.grad, expected_decay, atol=1e-7)


@pytest.mark.parametrize("resolutions, head_grad, scale", [([20, 16, 12], "mean", 1 / 3), ([20, 16, 12], "sum", None),
                                                            ([20], "mean", 1.0)])
def test_head_grad_mean_gives_the_classifier_a_single_models_step(resolutions, head_grad, scale):
    config = TrainConfig(model="resnet20", resolutions=resolutions, batch_size=8, lr=0.05, device="cpu",
                         head_grad=head_grad, norm_lr_factor=1.0)  # the BNs' own group would also scale
    model = rsq.create_model("resnet20", 10, 1, resolutions=resolutions)
    job = TrainJob.create(config, model)
    head = [g for g in job.optimizer.param_groups if "lr_scale" in g]
    if scale is None or scale == 1.0:  # the paper's sum, and a single model: no group of its own
        assert head == []
    else:
        assert [id(p) for p in head[0]["params"]] == [id(model.fc.weight), id(model.fc.bias)]
        assert head[0]["lr_scale"] == pytest.approx(scale)
        assert head[0]["weight_decay"] == config.weight_decay
    g = torch.Generator().manual_seed(0)
    train_step(job, torch.randn(8, 1, 20, 20, generator=g), torch.randint(0, 10, (8,), generator=g), 0.05)
    lrs = {id(p): group["lr"] for group in job.optimizer.param_groups for p in group["params"]}
    assert lrs[id(model.fc.weight)] == pytest.approx(0.05 * (scale or 1.0))
    assert lrs[id(model.conv1.weight)] == pytest.approx(0.05)


@pytest.mark.parametrize("resolutions, factor, scale", [([20, 16, 12], 5.0, 5.0), ([20, 16, 12], 1.0, None),
                                                        ([20], 5.0, None)])
def test_norm_lr_factor_steps_the_private_batchnorms_only(resolutions, factor, scale):
    config = TrainConfig(model="resnet20", resolutions=resolutions, batch_size=8, lr=0.05, device="cpu",
                         norm_lr_factor=factor)
    model = rsq.create_model("resnet20", 10, 1, resolutions=resolutions)
    job = TrainJob.create(config, model)
    g = torch.Generator().manual_seed(0)
    train_step(job, torch.randn(8, 1, 20, 20, generator=g), torch.randint(0, 10, (8,), generator=g), 0.05)
    groups = {id(p): group for group in job.optimizer.param_groups for p in group["params"]}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 21 * len(resolutions)  # every mode's private BN
    for bn in bns:
        for p in (bn.weight, bn.bias):
            assert groups[id(p)]["lr"] == pytest.approx(0.05 * (scale or 1.0))
            assert groups[id(p)]["weight_decay"] == config.weight_decay
    assert groups[id(model.conv1.weight)]["lr"] == pytest.approx(0.05)  # the shared weights keep the rate
    assert groups[id(model.fc.weight)]["lr"] == pytest.approx(0.05 / len(resolutions))  # head_grad mean
    # decay, no decay, the head's and the convolutions' groups, and the BNs' own; a single mode is a plain model
    assert len(job.optimizer.param_groups) == {5.0: 5, None: 4 if len(resolutions) > 1 else 2}[scale]
    # Quantized weights keep one model's rate for their BNs, as they keep one model's decay (measured on float only).
    qmodel = rsq.quantize_(rsq.create_model("resnet20", 10, 1, resolutions=resolutions),
                           rsq.QuantConfig(weight_bits=4, act_bits=4))
    quantized = TrainJob.create(config.replace(weight_bits=4, act_bits=4), qmodel)
    qgroups = {id(p): group for group in quantized.optimizer.param_groups for p in group["params"]}
    qbns = [m for m in qmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert qbns and all(qgroups[id(bn.weight)].get("lr_scale", 1.0) == 1.0 for bn in qbns)
