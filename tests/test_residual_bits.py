"""The residual stream on learned grids (QuantConfig(residual_bits=8), `rsq train --residual-bits 8`): the
modules it adds and removes, its integer lowering (every add reads and writes narrow integers), and the
formats that take it."""
import copy
import pickle

import numpy as np
import pytest
import torch

import rsq
from rsq.config import TrainConfig
from rsq.errors import RsqError
from rsq.export.lower import lower
from rsq.nn.residual import ResidualGrid
from rsq.quantize import QuantConfig, dequantize_, quantize_
from rsq.runtime import Runtime

from helpers import quantized_resnet20, runtime_vs_fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLUTIONS = [16, 12]


@pytest.fixture(scope="module")
def model():
    return quantized_resnet20(4, RESOLUTIONS, residual_bits=8).eval()


def test_quantizers_sit_where_the_adds_read_and_dequantize_removes_them():
    model = quantized_resnet20(4, RESOLUTIONS, residual_bits=8)
    first, transition = model.layer1[0], model.layer2[0]
    assert isinstance(first.bn2, ResidualGrid) and first.bn2[1].bits == 8 and first.bn2[1].signed
    assert isinstance(transition.downsample, ResidualGrid) and len(transition.downsample) == 3
    assert not first.residual_output.signed and hasattr(first, "residual_input")
    assert not hasattr(model.layer1[1], "residual_input")  # only the stem's output needs one
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():  # deepcopy and pickle keep the block classes (they pickle as their base classes)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert type(twin.layer1[0]) is type(first) and torch.equal(twin.eval()(x), model.eval()(x))
    plain = rsq.create_model("resnet20", 10, 1, resolutions=RESOLUTIONS)
    restored = dequantize_(model)
    assert type(restored.layer1[0]) is type(plain.layer1[0])
    assert set(restored.state_dict()) == set(plain.state_dict())


def test_lowered_residual_stream_is_narrow_and_agrees(model):
    integer_model = lower(model)
    readers = {}
    for op in integer_model.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    for name, info in integer_model.tensors.items():
        if info.kind == "wide":  # only an add's sum, requantized at once onto the block output's grid
            assert [op.kind for op in readers[name]] == ["requantize"], name
    for op in integer_model.ops:
        if op.kind in ("add", "global_avg_pool"):
            assert all(integer_model.tensors[name].kind == "narrow" for name in op.inputs), op.name
            assert all(integer_model.tensors[name].bits == 8 for name in op.inputs), op.name
    runtime = Runtime(integer_model)
    x = torch.randn(64, 1, 16, 16) * 1.5
    for r in RESOLUTIONS:
        agreement, error = runtime_vs_fake_quant(model, runtime, x, r)
        assert agreement >= 0.98 and error < 0.01, (r, agreement, error)


def test_exact_onnx_and_c_equal_the_runtime_and_the_c_arena_shrinks(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from rsq.export.c_source import MEMORY_FILE, write_c
    from rsq.export.onnx import write_onnx
    from rsq.runtime.native import NativeRuntime, find_compiler

    integer_model = lower(model)
    runtime = Runtime(integer_model)
    for path, r in zip(write_onnx(integer_model, tmp_path / "onnx"), integer_model.resolutions):
        x = np.random.default_rng(r).standard_normal((8, 1, r, r)).astype(np.float32)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert np.array_equal(session.run(None, {"input": x})[1], runtime.run(x, r))
    write_c(integer_model, tmp_path / "c")
    write_c(lower(quantized_resnet20(4, RESOLUTIONS).eval()), tmp_path / "c_float_residual")
    import json
    ours, theirs = (json.loads((tmp_path / d / MEMORY_FILE).read_text())["resolutions"]["16"]["activation_bytes"]
                    for d in ("c", "c_float_residual"))
    assert ours <= 0.6 * theirs  # int8 instead of int32 between blocks
    if find_compiler():
        native = NativeRuntime(tmp_path / "c")
        x = np.random.default_rng(0).standard_normal((8, 1, 12, 12)).astype(np.float32)
        assert np.array_equal(native.run(x, 12), runtime.run(x, 12))


def test_snapping_puts_each_narrow_conv_bias_on_the_int8_kernels_grid(model):
    """rsq.export.snap moves BN shifts so that each conv with a narrow output has a folded bias the int8 kernels
    hold (kernel_bias_bits fraction bits), by at most half a kernel unit, and moves nothing else."""
    from rsq.export.snap import kernel_bias_bits, snap_biases

    snapped = copy.deepcopy(model)
    report = snap_biases(snapped)
    assert report["convs"] == 21 and 0 < report["largest_move"] <= 0.5  # every conv (2 downsample): all narrow

    def fractions(net):
        """Per narrow conv and resolution: how far the lowered bias is from the kernel's grid, in kernel units."""
        integer_model = lower(net)
        out = []
        for op in integer_model.ops:
            if op.kind == "conv" and integer_model.tensors[op.output].kind == "narrow":
                weight = integer_model.weights[op.attrs["weight"]]
                bits = kernel_bias_bits(weight.values, weight.bits, integer_model.tensors[op.inputs[0]].bits)
                for r in RESOLUTIONS:
                    table = integer_model.tables[r][op.name]
                    units = table["bias"] / 2.0 ** (int(table["bias_shift"][0]) - bits)
                    out.append(np.abs(units - np.rint(units)).max())
        return np.array(out)

    assert fractions(model).max() > 0.1  # as trained (here: initialised), the biases fall anywhere
    assert fractions(snapped).max() < 1e-2  # float32 storage of the BN shift leaves a trace of noise
    moved = [(a - b).abs().max() for a, b in zip(snapped.state_dict().values(), model.state_dict().values())
             if a.is_floating_point() and not torch.equal(a, b)]
    assert moved and len(moved) == 21 * len(RESOLUTIONS)  # one BN shift per conv and resolution, nothing else
    assert snap_biases(snapped)["largest_move"] < 1e-2  # snapped already: nothing left to move


def test_bad_combinations_are_clear_errors():
    with pytest.raises(RsqError, match="pick one"):
        QuantConfig(4, 4, quantized_shortcut=True, residual_bits=8)
    with pytest.raises(RsqError, match="residual_bits"):
        QuantConfig(4, 4, residual_bits=9)
    with pytest.raises(RsqError, match="needs quantized activations"):
        TrainConfig(residual_bits=8)
    with pytest.raises(RsqError, match="pick one"):
        TrainConfig(weight_bits=4, act_bits=4, residual_bits=8, quantized_shortcut=True)
    joint = rsq.create_model("resnet20", 10, 1)
    rsq.convert(joint, RESOLUTIONS, bits=[4, 8])
    with pytest.raises(RsqError, match="one bit width"):
        quantize_(joint, QuantConfig(residual_bits=8))
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(RsqError, match="needs residual blocks"):
        quantize_(plain, QuantConfig(residual_bits=8))


def test_a_trained_checkpoint_reloads_and_exports_the_integer_formats_only(tmp_path, capsys):
    from rsq.checkpoint import load_model
    from rsq.export import export_checkpoint
    from rsq.train import train

    config = TrainConfig(weight_bits=4, act_bits=4, residual_bits=8, subset=256, test_subset=32, epochs=1,
                         resolutions=RESOLUTIONS, batch_size=64, out=str(tmp_path / "run"), device="cpu")
    result = train(config, overwrite=True)
    assert result["quant"]["residual_bits"] == 8
    model, ckpt = load_model(tmp_path / "run")
    assert isinstance(model.layer1[0].bn2, ResidualGrid)
    step = model.layer1[0].residual_output.step.detach()
    assert torch.equal(step, ckpt["model"]["layer1.0.residual_output.step"]) and bool(step.gt(0).all())
    from rsq.cli import main
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "all")]) == 0  # --format all
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "all").iterdir() if p.is_dir()) == ["c", "onnx", "packed", "qlinear"]
    assert "qonnx, pt2e, executorch, executorch-exact left out" in out
    # Every conv output is narrow here, and the export snaps their biases onto the int8 kernels' grid
    # (rsq.export.snap): the QLinear graph then computes rsq.runtime's integers, its pooled features equal.
    from rsq.verify import verify_export
    checked = verify_export(tmp_path / "all", test_subset=32, quiet=True, latency=False)
    rows = [row for row in checked["rows"] if row["artifact"] == "qlinear"]
    assert [row["resolution"] for row in rows] == RESOLUTIONS
    assert all(row["integers_vs_runtime"] == "avgpool: identical" and row["agreement"] == 100.0 for row in rows)
    assert checked["bias_snap"]["convs"] == 21
    export_checkpoint(tmp_path / "run", "packed", tmp_path / "export")
    with pytest.raises(RsqError, match="does not take a residual stream on learned grids"):
        export_checkpoint(tmp_path / "run", "pt2e", tmp_path / "export")
    from rsq.export.pt2e import to_pt2e
    from rsq.interop.brevitas import to_brevitas
    for convert in (to_pt2e, to_brevitas):  # the Python API refuses too, before any work
        with pytest.raises(RsqError, match="does not take a residual stream on learned grids"):
            convert(model, 16, *((1,) if convert is to_pt2e else ()))
