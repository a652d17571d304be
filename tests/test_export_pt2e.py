"""PT2E (torchao) and ExecuTorch (XNNPACK) export of an LSQ RS-Net: same answers, rsq's own steps."""
import copy
import sys

import numpy as np
import pytest
import torch

import rsq
from rsq.convert import using_mode
from rsq.errors import RsqError
from rsq.nn.quantizers import SwitchableQuantizer, quantizer_in_mode

pytest.importorskip("torchao.quantization.pt2e.quantize_pt2e")

from rsq.export.pt2e import activation_qparams, float_model_for, to_pt2e, weight_shift  # noqa: E402

RESOLUTIONS = [12, 8]
QD = torch.ops.quantized_decomposed


def _class_images(n: int, resolution: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of ten fixed patterns: a task a few steps of training separates clearly,
    so the logits have margins and top-1 agreement measures the export, not ties."""
    patterns = torch.randn(10, 1, 4, 4, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = torch.nn.functional.interpolate(patterns[labels], size=resolution, mode="bilinear")
    return images + 0.3 * torch.randn(images.shape, generator=generator), labels


def _trained(bits: int):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = rsq.create_model("resnet20", 10, 1, resolutions=RESOLUTIONS)
    rsq.quantize_(net, rsq.QuantConfig(weight_bits=bits, act_bits=bits))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(1)
    net.train()
    for _ in range(12):  # training-mode forwards initialise every quantizer and each BN set
        for r in RESOLUTIONS:
            x, y = _class_images(64, r, generator)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def model():
    return _trained(4)


@pytest.fixture(scope="module")
def model8():
    return _trained(8)


def _reference(model, x, resolution):
    with torch.no_grad(), using_mode(model, resolution):
        return model(x)


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_pt2e_program_matches_fake_quant(model, resolution):
    x, _ = _class_images(256, resolution, torch.Generator().manual_seed(2))
    reference = _reference(model, x, resolution)
    program = to_pt2e(model, resolution, in_chans=1)
    with torch.no_grad():
        out = program.module()(x)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    # The q op computes x * (1 / step), rsq x / step: a value at a rounding tie can land one step
    # apart, so a few rows differ a little; every other row is equal to float precision.
    row_error = (out - reference).abs().amax(1)
    assert (row_error <= 1e-4 * reference.abs().max()).float().mean() >= 0.95


def _gemm_layer(program, gemm) -> str:
    """The rsq layer of a conv / linear node of a converted program, read from its bias parameter."""
    return program.graph_signature.inputs_to_parameters[gemm.args[2].name].rsplit(".", 1)[0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("backend", ["x86", "xnnpack"])
def test_readers_of_one_tensor_keep_their_own_steps(model, model8, backend, bits):
    """A block's conv1 and its downsample conv read the same tensor with steps of their own: each
    must be quantized with its own. torchao shares one observer between readers whose specs agree
    in dtype and range (it does not compare the steps): 8-bit grids, which need no clamp per reader."""
    resolution = RESOLUTIONS[0]
    net = copy.deepcopy(model8 if bits == 8 else model)
    shortcut = quantizer_in_mode(net.layer2[0].downsample[0].act_quantizer, f"r{resolution}")
    with torch.no_grad():
        shortcut.step.mul_(1.25)
    program = to_pt2e(net, resolution, in_chans=1, backend=backend)
    seen = 0
    for gemm in program.graph.nodes:
        if gemm.target not in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            continue
        layer = _gemm_layer(program, gemm)
        act = quantizer_in_mode(net.get_submodule(layer).act_quantizer, f"r{resolution}")
        assert gemm.args[0].target == QD.dequantize_per_tensor.default, layer
        assert gemm.args[0].args[1] == float(act.step.detach()), layer
        seen += layer in ("layer2.0.conv1", "layer2.0.downsample.0")
    assert seen == 2
    x, _ = _class_images(64, resolution, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = program.module()(x)
    reference = _reference(net, x, resolution)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.99


def test_pt2e_w8a8_matches_fake_quant(model8):
    """8-bit grids are 16 times finer than 4-bit ones: any step the export gets wrong shows here."""
    net = model8
    resolution = RESOLUTIONS[0]
    x, _ = _class_images(256, resolution, torch.Generator().manual_seed(5))
    reference = _reference(net, x, resolution)
    with torch.no_grad():
        out = to_pt2e(net, resolution, in_chans=1).module()(x)
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    row_error = (out - reference).abs().amax(1)
    assert (row_error <= 1e-4 * reference.abs().max()).float().mean() >= 0.8  # 0.2 before the fix


def test_xnnpack_weights_fill_int8(model):
    """XNNPACK programs store 4-bit weights as q * 2**k with scale step / 2**k: the same real
    values, but a 2**k times finer accumulator unit for the bias XNNPACK rounds to int32."""
    resolution = RESOLUTIONS[0]
    program = to_pt2e(model, resolution, in_chans=1, batch=1, backend="xnnpack")
    float_model, grids = float_model_for(model, resolution, 1)
    checked = 0
    for gemm in program.graph.nodes:
        weight_dq = gemm.args[1] if gemm.target == torch.ops.aten.conv2d.default else None
        if weight_dq is None or weight_dq.target != QD.dequantize_per_channel.default:
            continue
        layer = _gemm_layer(program, gemm)
        ints = _graph_tensor(program, weight_dq.args[0]).to(torch.int64)
        scale = _graph_tensor(program, weight_dq.args[1])
        assert (scale > 0).all(), layer  # XNNPACK refuses a negative scale
        per_channel = (-1,) + (1,) * (ints.dim() - 1)
        rsq_ints = grids[layer].weight_int * torch.sign(grids[layer].weight_scale).to(torch.int64).reshape(per_channel)
        k = weight_shift(rsq_ints)
        assert torch.equal(ints, rsq_ints * 2 ** k.reshape(per_channel)), layer
        assert ints.min() >= -128 and ints.max() <= 127
        assert (ints.reshape(len(ints), -1).abs().amax(1) >= 64).all(), layer  # at least half of int8
        # The real weights are rsq's up to the fitted scale (fit_xnnpack_requantization): within the
        # per-mille that moves no rounding boundary of the layer's output.
        torch.testing.assert_close(ints * scale.reshape(per_channel), float_model.get_submodule(layer).weight,
                                   rtol=2e-3, atol=1e-7)
        checked += 1
    assert checked >= 3


def test_executorch_takes_negative_weight_steps(model, tmp_path):
    """A learned LSQ step can turn negative; XNNPACK refuses a negative scale (the method did not load),
    so the sign moves into the integers."""
    from rsq.export.executorch import run_executorch, write_executorch
    resolution = RESOLUTIONS[0]
    net = copy.deepcopy(model)
    with torch.no_grad():
        for conv in (net.layer1[0].conv1, net.layer2[0].conv1):  # requantized convs: int8 in XNNPACK
            conv.weight_quantizer.step[0] *= -1
    pte = write_executorch(net, [resolution], 1, tmp_path / "negative.pte")
    x, _ = _class_images(64, resolution, torch.Generator().manual_seed(6))
    reference = _reference(net, x, resolution)
    logits = torch.from_numpy(run_executorch(pte, f"r{resolution}", x.numpy()))
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.9


def test_weight_shift_per_channel():
    q = torch.tensor([[-8, 7, 0], [-7, 8, 1], [0, 0, 0], [-128, 5, 127], [-2, 1, 1]])
    assert weight_shift(q).tolist() == [4, 3, 7, 0, 6]


def _graph_tensor(program, node):
    """The value of a placeholder (lifted buffer / constant) node of an ExportedProgram."""
    signature = program.graph_signature
    name = signature.inputs_to_buffers.get(node.name) or signature.inputs_to_lifted_tensor_constants.get(node.name)
    return program.state_dict.get(name, program.constants.get(name))


def test_quant_params_are_rsq_steps(model):
    resolution = RESOLUTIONS[1]
    key = f"r{resolution}"
    program = to_pt2e(model, resolution, in_chans=1)
    gemms = [n for n in program.graph.nodes
             if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    _, grids = float_model_for(model, resolution, 1)
    assert len(gemms) == len(grids)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (rsq.nn.QuantConv2d, rsq.nn.QuantLinear))}
    # Activations: the dq feeding each gemm carries the layer's step, in the graph's execution order
    # (the same order as rsq's layers run).
    act_args = sorted(tuple(n.args[0].args[1:5]) for n in gemms)
    expected = []
    for name, layer in layers.items():
        act = layer.act_quantizer
        act = act.for_mode(key) if isinstance(act, SwitchableQuantizer) else act
        # Every sub-8-bit unsigned grid of this ResNet reads a ReLU's output: uint8 saturation clamps it.
        expected.append(activation_qparams(act, saturates=not act.signed and act.qp < 255))
        assert expected[-1][0] == float(act.step.detach())
    assert act_args == sorted(expected)
    # Weights: per-channel scales are rsq's step times |BN gain| (just the step for the FC).
    weight_scales = [_graph_tensor(program, n.args[1].args[1]) for n in gemms]
    for name, layer in layers.items():
        step = layer.weight_quantizer.step.detach().reshape(-1)
        if name == "fc":
            want = step
        else:
            bn_name = {"conv1": "bn1"}.get(name) or name.replace("conv", "bn").replace("downsample.0", "downsample.1")
            bn = model.get_submodule(bn_name).for_mode(key)
            want = step * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs().detach()
        assert any(s.shape == want.shape and torch.equal(s, want.float()) for s in weight_scales), name
    fc_dq = next(n for n in gemms if n.target == torch.ops.aten.linear.default).args[1]
    assert fc_dq.target == QD.dequantize_per_channel.default
    assert fc_dq.args[3:6] == (0, -128, 127)  # ch_axis 0, rsq's signed 8-bit range
    conv_dq = gemms[1].args[1]
    assert _graph_tensor(program, conv_dq.args[0]).abs().max() <= 8  # 4-bit integers in int8


@pytest.fixture(scope="module")
def pte(model, tmp_path_factory):
    pytest.importorskip("executorch.exir")
    from rsq.export.executorch import write_executorch
    return write_executorch(model, RESOLUTIONS, 1, tmp_path_factory.mktemp("pte") / "rsnet.pte")


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_executorch_matches_fake_quant(model, pte, resolution):
    from rsq.export.executorch import run_executorch
    x, _ = _class_images(128, resolution, torch.Generator().manual_seed(3))
    reference = _reference(model, x, resolution)
    logits = torch.from_numpy(run_executorch(pte, f"r{resolution}", x.numpy()))
    assert logits.shape == reference.shape
    # XNNPACK's int8 convs requantize in float32 with an int32 bias; the fitted scale and bias make them give
    # rsq.runtime's integers (requant_fit), so what is left is float32 summation order in the float ops.
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    row_error = (logits - reference).abs().amax(1)
    assert (row_error <= 1e-4 * reference.abs().max()).float().mean() >= 0.95


def test_xnnpack_requantization_fits_every_4bit_channel(model):
    """Every requantized int8 conv of a W4A4 XNNPACK program gets a scale and bias that reproduce
    rsq.runtime's integers for any input (15 boundaries on a 16x finer accumulator)."""
    from rsq.export.pt2e import fit_xnnpack_requantization, lowered
    resolution = RESOLUTIONS[0]
    float_model, grids = float_model_for(model, resolution, 1)
    report = fit_xnnpack_requantization(lowered(model, [resolution]), float_model, grids, resolution)
    assert report and all(exact == channels for exact, channels in report.values()), report


def test_executorch_methods_share_their_weights(model, pte, tmp_path):
    """Every resolution's method reads the same weights: two methods cost little more than one, where
    BN folded into the float-weight convs gave each method its own float32 copy."""
    from rsq.export.executorch import write_executorch
    one = write_executorch(model, RESOLUTIONS[:1], 1, tmp_path / "one.pte").stat().st_size
    folded = write_executorch(model, RESOLUTIONS, 1, tmp_path / "folded.pte", share_weights=False).stat().st_size
    shared = pte.stat().st_size
    float_weight_bytes = 4 * sum(p.numel() for name, p in model.named_parameters()
                                 if name.endswith(".weight") and p.dim() == 4) // 2  # about half the convs stay float
    print(f"one method {one} B, two shared {shared} B, two folded {folded} B")
    assert shared - one < 0.1 * one  # the second method: its graph and its tables (BN, steps)
    assert folded - shared > float_weight_bytes // 2


def test_executorch_float_gemms_match_fake_quant(model, tmp_path):
    """int8_gemms=False: no int8 conv, so no bias rounding; equal to the fake-quant model up to float order."""
    from rsq.export.executorch import run_executorch, write_executorch
    resolution = RESOLUTIONS[0]
    pte = write_executorch(model, RESOLUTIONS, 1, tmp_path / "float.pte", int8_gemms=False)
    x, _ = _class_images(128, resolution, torch.Generator().manual_seed(3))
    reference = _reference(model, x, resolution)
    logits = torch.from_numpy(run_executorch(pte, f"r{resolution}", x.numpy()))
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    row_error = (logits - reference).abs().amax(1)
    assert (row_error <= 1e-4 * reference.abs().max()).float().mean() >= 0.95


def test_executorch_unknown_method_is_one_line(pte):
    from rsq.export.executorch import run_executorch
    with pytest.raises(RsqError, match="r99") as info:
        run_executorch(pte, "r99", np.zeros((1, 1, 12, 12), np.float32))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("module, call", [
    ("torchao.quantization.pt2e.quantize_pt2e", "pt2e"),
    ("executorch.exir", "executorch"),
])
def test_missing_package_is_one_line(model, monkeypatch, tmp_path, module, call):
    from rsq.export import executorch, pt2e
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(RsqError) as info:
        if call == "pt2e":
            pt2e.write_pt2e(model, 12, 1, tmp_path / "m.pt2")
        else:
            executorch.write_executorch(model, [12], 1, tmp_path / "m.pte")
    message = str(info.value)
    assert "\n" not in message and module.split(".")[0] in message


def test_lqnet_is_refused():
    net = rsq.create_model("resnet20", 10, 1, resolutions=[8])
    rsq.quantize_(net, rsq.QuantConfig(weight_bits=4, act_bits=4, quantizer="lqnet"))
    with pytest.raises(RsqError, match="LQ-Nets"):
        to_pt2e(net.eval(), 8, 1)


def test_full_precision_edges_and_per_mode_steps():
    """first_last='fp' layers stay float ops; act_per_mode quantizers use this mode's step."""
    torch.manual_seed(0)
    net = rsq.create_model("resnet20", 10, 1, resolutions=[8, 6])
    rsq.quantize_(net, rsq.QuantConfig(weight_bits=4, act_bits=4, first_last="fp", act_per_mode=True))
    net.train()
    for r in (8, 6):
        net(torch.randn(16, 1, r, r))
    net.eval()
    x = torch.randn(32, 1, 6, 6)
    with torch.no_grad():
        out = to_pt2e(net, 6, 1).module()(x)
    torch.testing.assert_close(out, _reference(net, x, 6), atol=1e-5, rtol=1e-4)


def test_inductor_path_takes_any_batch_size(model, tmp_path):
    """`rsq verify` feeds full batches and a smaller last one: each must run through Inductor."""
    from rsq.export.pt2e import load_pt2e, write_pt2e

    path = write_pt2e(model, 12, 1, tmp_path / "m.pt2")
    compiled, plain = load_pt2e(path), load_pt2e(path, compile=False)
    for batch in (4, 3):
        x, _ = _class_images(batch, 12, torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert torch.allclose(compiled(x), plain(x), atol=1e-3 * plain(x).abs().max().item())


def test_executorch_exact_is_an_export_format_that_verify_runs(tmp_path):
    """`rsq export --format executorch-exact`: float convs between rsq's quantizations, equal to the fake-quant model."""
    from rsq.config import TrainConfig
    from rsq.export import export_checkpoint
    from rsq.train import train
    from rsq.verify import verify_export
    config = TrainConfig(weight_bits=4, act_bits=4, subset=512, test_subset=32, epochs=1, resolutions=[16, 12],
                         batch_size=64, lr=0.05, out=str(tmp_path / "run"), device="cpu")
    train(config, overwrite=True)
    export_checkpoint(tmp_path / "run", "executorch-exact", tmp_path / "export")
    assert (tmp_path / "export" / "executorch-exact" / "model.pte").is_file()
    rows = [row for row in verify_export(tmp_path / "export", test_subset=32, quiet=True, latency=False)["rows"]
            if row["artifact"] == "executorch-exact"]
    assert [row["resolution"] for row in rows] == [16, 12]
    assert all(row["agreement"] == 100.0 for row in rows), rows


def test_xnnpack_8bit_channels_without_exact_fit_take_the_calibrated_one(model8):
    """W8A8: most 8-bit output channels have no exact fit. Given calibration counts, each such channel takes the
    scale and bias that keep the rounding boundaries most values sit at, instead of XNNPACK's own rounding of
    its bias; the exact ones are the same either way."""
    from rsq.export.pt2e import fit_xnnpack_requantization, lowered
    from rsq.export.qlinear import calibrate
    resolution = RESOLUTIONS[0]
    integer = lowered(model8, [resolution])
    x, _ = _class_images(64, resolution, torch.Generator().manual_seed(7))
    counts = calibrate(integer, {resolution: x.numpy()})[1][resolution]
    plain_model, plain_grids = float_model_for(model8, resolution, 1)
    plain = fit_xnnpack_requantization(integer, plain_model, plain_grids, resolution)
    fitted_model, fitted_grids = float_model_for(model8, resolution, 1)
    fitted = fit_xnnpack_requantization(integer, fitted_model, fitted_grids, resolution, counts)
    assert fitted == plain and sum(channels - exact for exact, channels in plain.values()) > 0
    changed = 0
    for name, (exact, channels) in plain.items():
        before, after = plain_grids[name].fitted_scale, fitted_grids[name].fitted_scale
        bias_before = plain_model.get_submodule(name).bias
        bias_after = fitted_model.get_submodule(name).bias
        same = (before == after) & (bias_before == bias_after)
        assert int(same.sum()) >= exact  # the exact channels keep their fit
        changed += channels - int(same.sum())
    assert changed > 0


def test_executorch_without_the_runs_data_is_written_and_says_so(tmp_path, capsys):
    """The int8 program's calibrated fits need the run's training images; without them `rsq export` still writes
    the program (XNNPACK's rounding where no exact fit exists) and says so in one line."""
    pytest.importorskip("executorch.exir")
    from rsq.checkpoint import load_checkpoint
    from rsq.config import TrainConfig
    from rsq.export import export_checkpoint
    from rsq.train import train
    config = TrainConfig(weight_bits=8, act_bits=8, subset=256, test_subset=32, epochs=1, resolutions=[12],
                         batch_size=64, lr=0.05, out=str(tmp_path / "run"), device="cpu")
    train(config, overwrite=True)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    ckpt["config"] = {**ckpt["config"], "data_dir": str(tmp_path / "gone")}
    torch.save(ckpt, tmp_path / "moved.pt")
    capsys.readouterr()
    export_checkpoint(tmp_path / "moved.pt", "executorch", tmp_path / "export")
    assert (tmp_path / "export" / "executorch" / "model.pte").is_file()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert len(notes) == 1 and "gone" in notes[0] and "keep XNNPACK's rounding" in notes[0], notes
