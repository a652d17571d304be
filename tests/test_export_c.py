"""The C export (`rsq export --format c`): compiled with the system's C compiler, its integer logits equal
rsq.runtime's at every resolution, for every bit width, pooling and shortcut the lowering supports."""
import json
import subprocess

import numpy as np
import pytest
import torch

import rsq
from rsq.errors import RsqError
from rsq.export.c_source import MEMORY_FILE, plan_arena, tensor_shapes, write_c
from rsq.export.lower import lower
from rsq.quantize import QuantConfig, quantize_
from rsq.runtime import Runtime
from rsq.runtime.native import NativeRuntime, compile_export, find_compiler

from helpers import quantized_resnet20, warmed_up

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(find_compiler() is None, reason="no C compiler")]


def _images(r: int, n: int = 6, in_chans: int = 1, seed: int = 0) -> np.ndarray:
    # Scaled up so the first layer's clamps and the wide tensors' large values are exercised too.
    return (np.random.default_rng(seed + r).standard_normal((n, in_chans, r, r)) * 2).astype(np.float32)


def _assert_c_equals_runtime(integer_model, folder, in_chans: int = 1) -> NativeRuntime:
    write_c(integer_model, folder)
    native, runtime = NativeRuntime(folder), Runtime(integer_model)
    for r in integer_model.resolutions:
        x = _images(r, in_chans=in_chans)
        assert np.array_equal(native.run(x, r), runtime.run(x, r)), f"resolution {r}"
    return native


@pytest.mark.parametrize("bits", [4, 2])
def test_c_logits_equal_the_reference_runtime(bits, tmp_path):
    integer_model = lower(quantized_resnet20(bits, [16, 12, 8]).eval())
    native = _assert_c_equals_runtime(integer_model, tmp_path)
    assert native.num_classes == 10 and native.arena_bytes(16) > native.arena_bytes(8) > 0
    assert native.arena_bytes(20) == 0
    with pytest.raises(RsqError, match="resolution 20 is not in this C export"):
        native.run(_images(20), 20)


def test_c_handles_odd_bit_widths_signed_inputs_and_per_resolution_steps(tmp_path):
    # 3-bit weights straddle byte boundaries in the packed stream; first_last="same" puts a signed
    # 3-bit grid on the input; act_per_mode gives every resolution its own activation steps.
    model = quantized_resnet20(3, [12, 8], first_last="same", act_per_mode=True).eval()
    integer_model = lower(model)
    assert integer_model.tensors[integer_model.ops[0].output].signed
    _assert_c_equals_runtime(integer_model, tmp_path)


def test_c_runs_quantized_shortcuts(tmp_path):
    model = quantized_resnet20(4, [12, 8], quantized_shortcut=True).eval()
    _assert_c_equals_runtime(lower(model), tmp_path)


def test_c_runs_max_pooling_on_narrow_and_wide_grids(tmp_path):
    from test_export_maxpool import _initialised, _PoolNet

    model = _PoolNet()
    rsq.convert(model, [16, 8])
    quantize_(model, QuantConfig(4, 4, first_last="same"))
    integer_model = lower(_initialised(model, [16, 8]))
    kinds = {integer_model.tensors[op.output].kind for op in integer_model.ops if op.kind == "max_pool"}
    assert kinds == {"narrow", "wide"}
    _assert_c_equals_runtime(integer_model, tmp_path, in_chans=3)


def test_c_runs_depthwise_convs_relu6_and_adds_without_relu(tmp_path):
    # MobileNetV2: grouped (depthwise) convs, ReLU6 clamps and inverted-residual adds with no ReLU.
    torch.manual_seed(0)
    model = rsq.create_model("mobilenet_v2", 10, 3, resolutions=[32, 16])
    quantize_(model, QuantConfig(4, 4))
    integer_model = lower(warmed_up(model, [32, 16], 3, batch=4, rounds=1))
    assert any(op.attrs.get("groups", 1) > 1 for op in integer_model.ops)
    _assert_c_equals_runtime(integer_model, tmp_path, in_chans=3)


def test_the_writer_sizes_scratch_for_the_runtime_pixel_block():
    from importlib import resources

    from rsq.export.c_source import PIXEL_BLOCK
    header = (resources.files("rsq.runtime") / "c" / "rsq_runtime.h").read_text()
    assert f"#define RSQ_PIXEL_BLOCK {PIXEL_BLOCK}\n" in header


def test_arena_plan_never_overlaps_live_tensors_and_reuses_memory():
    integer_model = lower(quantized_resnet20(4, [16, 8]).eval())
    shapes = tensor_shapes(integer_model)[16]
    offsets = plan_arena(integer_model, shapes)
    ops = integer_model.ops
    width = {n: shapes[n][0] * shapes[n][1] * integer_model.tensors[n].channels
             * (4 if integer_model.tensors[n].kind in ("wide", "logits") else 1) for n in offsets}
    born = {op.output: i for i, op in enumerate(ops)}
    last = {n: max([i for i, op in enumerate(ops) if n in op.inputs] + [born[n]]) for n in offsets}
    last[integer_model.output] = len(ops)
    for i in range(len(ops)):
        live = sorted((offsets[n], offsets[n] + width[n]) for n in offsets if born[n] <= i <= last[n])
        assert all(end <= start for (_, end), (start, _) in zip(live, live[1:])), f"op {i}"
    assert max(offsets[n] + width[n] for n in offsets) < 0.5 * sum(width.values())


def test_pixels_run_integer_only_and_match_the_data_pipeline(tmp_path):
    from rsq.data import fashion_mnist
    from rsq.data.memory import _Normalizer

    integer_model = lower(quantized_resnet20(4, [28, 12]).eval())
    write_c(integer_model, tmp_path / "plain")
    with pytest.raises(RsqError, match="records no input normalisation"):
        NativeRuntime(tmp_path / "plain").run_pixels(np.zeros((1, 1, 12, 12), np.uint8), 12)
    integer_model.meta["input"] = {"mean": list(fashion_mnist.MEAN), "std": list(fashion_mnist.STD)}
    native, runtime = NativeRuntime(write_c(integer_model, tmp_path / "c").parent), Runtime(integer_model)
    normalize = _Normalizer(fashion_mnist.MEAN, fashion_mnist.STD, "cpu")  # what training and eval feed the model
    real, _ = fashion_mnist.load("test", None)
    rng = np.random.default_rng(0)
    for r, pixels in ((28, real[:16].numpy().reshape(16, 1, 28, 28)), (12, rng.integers(0, 256, (16, 1, 12, 12), dtype=np.uint8))):
        expected = runtime.run(normalize(torch.from_numpy(pixels)).numpy(), r)
        assert np.array_equal(native.run_pixels(pixels, r), expected)


def test_two_bit_weights_take_a_quarter_of_eight_bit_ones(tmp_path):
    sizes = {}
    for bits in (2, 8):
        model = quantized_resnet20(bits, [8], first_last="same").eval()
        write_c(lower(model), tmp_path / str(bits))
        sizes[bits] = json.loads((tmp_path / str(bits) / MEMORY_FILE).read_text())["weight_bytes"]
    assert sizes[2] * 4 <= sizes[8] + 4 * 22  # each of the 22 layers rounds up to a whole byte


def test_rsq_run_program_reads_images_and_writes_logits(tmp_path):
    integer_model = lower(quantized_resnet20(4, [12, 8]).eval())
    write_c(integer_model, tmp_path / "c")
    program = compile_export(tmp_path / "c", tmp_path / "rsq_run", shared=False)
    x = _images(12, n=4)
    done = subprocess.run([str(program), "12", "3"], input=x.tobytes(), capture_output=True, check=True)
    logits = np.frombuffer(done.stdout, np.int32).reshape(4, 10)
    assert np.array_equal(logits, Runtime(integer_model).run(x, 12))
    assert b"ms per image" in done.stderr
    no_table = subprocess.run([str(program), "-p", "12"], input=b"", capture_output=True)
    assert no_table.returncode == 2 and b"no input normalisation" in no_table.stderr
    refused = subprocess.run([str(program), "20"], input=b"", capture_output=True)
    assert refused.returncode == 2 and b"resolution 20 is not in this export" in refused.stderr


def test_missing_compiler_is_one_clear_error(tmp_path, monkeypatch):
    write_c(lower(quantized_resnet20(4, [8]).eval()), tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CC", raising=False)
    assert find_compiler() is None
    with pytest.raises(RsqError, match="needs a C compiler"):
        NativeRuntime(tmp_path)


def test_compiler_error_and_foreign_folder_are_rsq_errors(tmp_path):
    with pytest.raises(RsqError, match="is not a C export"):
        compile_export(tmp_path, tmp_path / "lib.so")
    write_c(lower(quantized_resnet20(4, [8]).eval()), tmp_path)
    (tmp_path / "rsq_model.c").write_text("this is not C\n")
    with pytest.raises(RsqError, match="compiling the C export .* failed"):
        NativeRuntime(tmp_path)


def test_generated_source_compiles_without_warnings(tmp_path):
    write_c(lower(quantized_resnet20(2, [8]).eval()), tmp_path)
    for name in ("rsq_model.c", "rsq_runtime.c", "rsq_run.c"):
        done = subprocess.run([find_compiler(), "-std=c99", "-Wall", "-Wextra", "-pedantic", "-c", "-o",
                               str(tmp_path / f"{name}.o"), str(tmp_path / name)], capture_output=True, text=True)
        assert done.returncode == 0 and not done.stderr.strip(), done.stderr
