"""LSQ and LQ-Nets quantizers against the formulas of docs/methods.md §2 and §3."""
import copy
import math
from itertools import product

import pytest
import torch

from rsq.errors import RsqError
from rsq.nn import LQNetQuantizer, LSQQuantizer, Mode, ModeState, SwitchableQuantizer
from rsq.nn.quantizers import integer_range, lsq_reference

BAD_BITS = [0, 1, 9, 33, "four", [], 4.0, True, None]

pytestmark = pytest.mark.usefixtures("one_thread")


def lsq_with_step(bits, signed, step, per_channel=False):
    q = LSQQuantizer(bits, signed=signed, per_channel=per_channel, channels=len(step) if per_channel else 1, ndim=2)
    with torch.no_grad():
        q.step.copy_(torch.tensor(step).reshape(q.step.shape))
        q.initialized.fill_(True)
    return q


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_output_is_on_the_integer_grid(bits, signed):
    torch.manual_seed(bits)
    qn, qp = integer_range(bits, signed)
    for per_channel in (False, True):
        q = LSQQuantizer(bits, signed, per_channel, channels=6, ndim=4).train()
        x = torch.randn(6, 3, 4, 4) * 3
        out = q(x)
        grid = out / q.step.detach()
        assert torch.allclose(grid, grid.round(), atol=1e-4)
        assert grid.round().min() >= -qn and grid.round().max() <= qp
        assert len(grid.round().unique()) > min(qp + qn, 3)  # really uses the grid, not one level


@pytest.mark.parametrize("bits", range(2, 9))
def test_lsq_grid_ends_are_the_published_ones(bits):
    # Signed: -2^(b-1) .. 2^(b-1)-1; unsigned: 0 .. 2^b-1 (docs/methods.md §2).
    x = torch.tensor([[-1e4, -0.3, 0.0, 0.3, 1e4]])
    for signed, low, high in [(True, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), (False, 0, 2**bits - 1)]:
        grid = lsq_with_step(bits, signed, [0.25])(x) / 0.25
        assert grid[0, 0].item() == low and grid[0, -1].item() == high


def hand_lsq_grads(x, step, qn, qp, upstream, n):
    """docs/methods.md §2, element by element in plain Python."""
    g = 1 / math.sqrt(n * qp)
    grad_x, grad_s = [], 0.0
    for xi, ui in zip(x, upstream):
        v = xi / step
        if v < -qn:
            grad_x.append(0.0)
            grad_s += ui * -qn
        elif v > qp:
            grad_x.append(0.0)
            grad_s += ui * qp
        else:
            grad_x.append(ui)
            grad_s += ui * (round(v) - v)
    return torch.tensor(grad_x), grad_s * g


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_match_the_formula_inside_below_and_above(signed):
    step, bits = 0.5, 2
    qn, qp = integer_range(bits, signed)
    # v = x/s: far below, exactly -Qn, inside (both rounding directions), exactly Qp, above.
    values = [-3.1, -qn * step, -0.3, 0.2, 0.45, 0.8, qp * step, qp * step + 0.2, 5.0]
    upstream = [0.3, -1.2, 0.7, 1.1, -0.4, 0.9, 1.3, -0.8, 0.6]
    expected_x, expected_s = hand_lsq_grads(values, step, qn, qp, upstream, n=len(values))
    for impl in ("module", "reference"):
        x = torch.tensor([values], requires_grad=True)
        q = lsq_with_step(bits, signed, [step])
        if impl == "module":
            out = q(x)
        else:
            out = lsq_reference(x, q.step, qn, qp, 1 / math.sqrt(len(values) * qp))
        out.backward(torch.tensor([upstream]))
        assert torch.allclose(x.grad[0], expected_x, atol=1e-6), impl
        assert q.step.grad.item() == pytest.approx(expected_s, abs=1e-5), impl


def test_lsq_per_channel_gradients_match_the_formula():
    steps, bits = [0.5, 0.25], 3
    qn, qp = integer_range(bits, True)
    rows = [[-2.3, -0.3, 0.2, 1.9, 0.4], [0.1, -0.9, 1.2, -0.05, 0.3]]
    upstream = [[0.5, -1.0, 0.3, 0.8, 1.2], [-0.7, 0.2, 0.9, 0.4, -1.1]]
    q = lsq_with_step(bits, True, steps, per_channel=True)
    x = torch.tensor(rows, requires_grad=True)
    q(x).backward(torch.tensor(upstream))
    for c in range(2):
        ex, es = hand_lsq_grads(rows[c], steps[c], qn, qp, upstream[c], n=len(rows[c]))
        assert torch.allclose(x.grad[c], ex, atol=1e-6)
        assert q.step.grad[c, 0].item() == pytest.approx(es, abs=1e-5)


def test_lsq_initialises_once_from_the_first_training_batch_and_survives_loading():
    q = LSQQuantizer(4, signed=False, per_channel=False).train()
    x = torch.rand(8, 3, 5, 5)
    q(x)
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(15), rel=1e-5)
    assert "initialized" in q.state_dict() and bool(q.initialized)
    fresh = LSQQuantizer(4, signed=False, per_channel=False).train()
    fresh.load_state_dict(q.state_dict())
    fresh(torch.rand(8, 3, 5, 5) * 100)  # must not re-initialise from this batch
    assert fresh.step.item() == q.step.item()


def test_lsq_weight_init_is_per_channel():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([1.0, 2.0, 0.5, 3.0]).view(4, 1, 1, 1)
    q = LSQQuantizer(4, signed=True, per_channel=True, channels=4).train()
    q(w)
    expected = 2 * w.abs().mean(dim=(1, 2, 3)) / math.sqrt(7)
    assert q.step.shape == (4, 1, 1, 1)
    assert torch.allclose(q.step.detach().flatten(), expected)
    assert LSQQuantizer(4, True, True, channels=5, ndim=2).step.shape == (5, 1)


def test_uninitialised_quantizers_pass_through_in_eval_and_32_bits_is_identity():
    x = torch.randn(2, 3, 4, 4)
    for cls in (LSQQuantizer, LQNetQuantizer):
        assert torch.equal(cls(4, True, False).eval()(x), x)
        off = cls(32, True, True, channels=2).train()
        assert off(x) is x and not list(off.parameters()) and not list(off.buffers())


@pytest.mark.parametrize("bits", BAD_BITS)
def test_bad_bits_raise_rsq_error(bits):
    for cls in (LSQQuantizer, LQNetQuantizer):
        with pytest.raises(RsqError, match="bits"):
            cls(bits, True, False)


def test_lsq_steps_are_excluded_from_weight_decay_even_after_deepcopy():
    q = LSQQuantizer(4, True, True, channels=3)
    assert q.step._rsq_no_weight_decay is True
    assert copy.deepcopy(q).step._rsq_no_weight_decay is True


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_lqnet_output_lies_in_the_level_set(bits):
    torch.manual_seed(0)
    cases = [(True, True, torch.randn(4, 3, 3, 3)), (False, False, torch.randn(2, 4, 6, 6).relu())]
    for signed, per_channel, x in cases:
        q = LQNetQuantizer(bits, signed, per_channel, channels=4).train()
        q(x)  # initialises the basis
        basis = q.basis.clone()
        out = q(x)  # quantizes with `basis`, then updates it
        codes = torch.tensor(list(product([-1.0, 1.0] if signed else [0.0, 1.0], repeat=bits)))
        levels = basis @ codes.T  # [rows, 2^K]
        rows = out.reshape(levels.shape[0], -1)
        distance = (rows.unsqueeze(-1) - levels.unsqueeze(1)).abs().min(-1).values
        assert distance.max() < 1e-5
        nearest = (x.reshape(levels.shape[0], -1).unsqueeze(-1) - levels.unsqueeze(1)).abs().min(-1).values
        assert torch.allclose((x.reshape_as(rows) - rows).abs(), nearest, atol=1e-5)


def test_lqnet_qem_moves_the_basis_towards_the_least_squares_fit():
    torch.manual_seed(1)
    w = torch.randn(3, 8, 3, 3)
    q = LQNetQuantizer(2, signed=True, per_channel=True, channels=3).train()
    q(w)
    old = q.basis.clone()
    q.eval()
    codes_before = q(w)  # eval: quantize only
    q.train()
    q(w)
    for c in range(3):
        # Recover the codes B from the quantized values, then the least-squares basis.
        levels, order = (old[c] @ q.codes.T).sort()
        index = (codes_before[c].reshape(-1, 1) - levels).abs().argmin(1)
        b = q.codes[order][index]
        fit = torch.linalg.lstsq(b, w[c].reshape(-1, 1)).solution.flatten()
        assert torch.allclose(q.basis[c], 0.9 * old[c] + 0.1 * fit, atol=1e-4)
        before = (b @ old[c] - w[c].flatten()).norm()
        assert (b @ q.basis[c] - w[c].flatten()).norm() <= before + 1e-6


def test_lqnet_straight_through_gradients():
    w = torch.randn(2, 5, requires_grad=True)
    LQNetQuantizer(2, True, True, channels=2).train()(w).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # weights: identity
    q = LQNetQuantizer(2, signed=False, per_channel=False).train()
    q(torch.rand(2, 5))
    top = (q.basis @ q.codes.T).max().item()
    x = torch.tensor([[0.0, top * 0.5, top, top * 1.5]], requires_grad=True)
    q.eval()(x).sum().backward()
    assert x.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]  # activations: only up to the top level


def test_switchable_quantizer_has_one_quantizer_per_mode():
    state = ModeState([Mode(32), Mode(16)])
    sq = SwitchableQuantizer(state, lambda bits: LSQQuantizer(4, False, False)).train()
    assert set(sq.quantizers) == {"r32", "r16"} and sq.bits == 4
    state.current = state.find(16)
    sq(torch.rand(2, 3, 16, 16))
    assert bool(sq.quantizers["r16"].initialized) and not bool(sq.quantizers["r32"].initialized)
    assert sq.quantizers["r16"].step is not sq.quantizers["r32"].step


def test_lsq_step_gradient_under_cpu_bf16_is_summed_in_float32():
    # A bf16 dot on the CPU has no BLAS kernel (two thirds of a W4A4 step under --amp bf16) and sums in
    # bf16; the step's gradient takes the factors to float32 instead.
    from rsq.nn.quantizers import _dot
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 16, 12, 12, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b = torch.randn(64, 16, 12, 12, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    got = _dot(a, b)
    exact = (a.double() * b.double()).sum()
    assert got.dtype == torch.float32
    assert abs(got.double() - exact) <= 1e-5 * (a.double() * b.double()).abs().sum()
    q = LSQQuantizer(4, signed=False, per_channel=False)
    x = torch.rand(8, 4, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q(x.bfloat16()).float().sum().backward()
    assert q.step.grad.dtype == torch.float32 and torch.isfinite(q.step.grad).all()
