"""Integer export of small trained W4A4 / W2A2 RS-Nets: lower, rsq.runtime, packed, ONNX, verify."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from rsq.checkpoint import load_model
from rsq.config import TrainConfig
from rsq.data import fashion_mnist
from rsq.data.multires import resize_batch
from rsq.export import export_checkpoint
from rsq.export.lower import lower
from rsq.runtime import Runtime, dequantize_logits, load
from rsq.runtime.packed import packed_size
from rsq.train import train

from helpers import runtime_vs_fake_quant

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLUTIONS = [16, 12]
BITS = [4, 2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{bits: (run folder, export folder)}: 12 SGD steps each, exported as onnx, packed and c."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    made = {}
    for bits in BITS:
        root = tmp_path_factory.mktemp(f"w{bits}")
        config = TrainConfig(weight_bits=bits, act_bits=bits, subset=768, test_subset=64, epochs=1,
                             resolutions=RESOLUTIONS, batch_size=64, lr=0.05, out=str(root / "run"), device="cpu")
        train(config, overwrite=True)
        export_checkpoint(root / "run", "onnx", root / "export")
        export_checkpoint(root / "run", "packed", root / "export")
        export_checkpoint(root / "run", "c", root / "export")
        made[bits] = (root / "run", root / "export")
    torch.set_num_threads(threads)
    return made


@pytest.fixture(scope="module")
def images():
    x, y = fashion_mnist.load("test", None)
    x = (x[:128].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
    return x, y[:128]


@pytest.mark.parametrize("bits", BITS)
def test_runtime_agrees_with_fake_quant_model(runs, images, bits):
    model, _ = load_model(runs[bits][0])
    integer_model = lower(model)
    runtime = Runtime(integer_model)
    for r in RESOLUTIONS:
        agreement, error = runtime_vs_fake_quant(model, runtime, images[0], r)
        assert agreement >= 0.97, (r, agreement)
        assert error < 0.02, (r, error)


def test_lower_is_deterministic_and_packed_round_trips(runs):
    run, export = runs[4]
    first = lower(load_model(run)[0])
    second = lower(load_model(run)[0])
    assert first.digest() == second.digest()
    packed = load(export / "packed")
    assert json.loads((export / "export.json").read_text())["formats"]["packed"]["digest"] == packed.digest()


def test_weights_identical_across_resolutions_tables_differ(runs):
    model, _ = load_model(runs[4][0])
    at16, at12 = lower(model, [16]), lower(model, [12])
    assert sorted(at16.weights) == sorted(at12.weights)
    for name in at16.weights:
        assert at16.weights[name].values.tobytes() == at12.weights[name].values.tobytes()
    assert any(not np.array_equal(at16.tables[16][op][key], at12.tables[12][op][key])
               for op in at16.tables[16] for key in at16.tables[16][op])


@pytest.mark.parametrize("bits", BITS)
def test_runtime_on_packed_equals_in_memory_and_float_gemm(runs, images, bits):
    run, export = runs[bits]
    in_memory = Runtime(lower(load_model(export / "checkpoint.pt")[0]))  # the exported (snapped) model
    packed = Runtime(load(export / "packed"))
    fast = Runtime(load(export / "packed"), gemm="float")
    for r in RESOLUTIONS:
        x = resize_batch(images[0][:32], r).numpy()
        want = in_memory.run(x, r)
        assert np.array_equal(packed.run(x, r), want)
        assert np.array_equal(fast.run(x, r), want)


def test_packed_weights_take_their_bit_width(runs):
    manifest = json.loads((runs[2][1] / "packed" / "manifest.json").read_text())
    widths = {w["bits"] for w in manifest["weights"]}
    assert widths == {2, 8}  # 8-bit first conv and last linear
    for w in manifest["weights"]:
        count = int(np.prod(w["shape"]))
        assert w["nbytes"] == packed_size(count, w["bits"])
        if w["bits"] == 2:
            assert w["nbytes"] * 4 == count  # a quarter of int8


@pytest.mark.parametrize("bits", BITS)
def test_onnx_is_valid_integer_only_and_matches_runtime(runs, images, bits):
    export = runs[bits][1]
    reference = Runtime(load(export / "packed"))
    files = sorted((export / "onnx").glob("model_r*.onnx"))
    assert [f.name for f in files] == ["model_r12.onnx", "model_r16.onnx"]
    assert sorted(p.name for p in (export / "onnx").iterdir()) == ["model.onnx", "model_r12.onnx", "model_r16.onnx",
                                                                  "weights.bin"]
    for path in files:
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        locations = {e.value for t in external for e in t.external_data if e.key == "location"}
        assert external and locations == {"weights.bin"}
        inferred = onnx.shape_inference.infer_shapes(proto)
        values = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
        float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
        assert {out for node in proto.graph.node for out in node.output} <= {v.name for v in values}  # all typed
        floats = {v.name for v in values if v.type.tensor_type.elem_type in float_types}
        assert floats == {"input", "logits"}
        # Requantization is one function, integer inside (int64, uint64 for the shift, but for its final Cast to
        # the output type) ...
        [function] = proto.functions
        assert function.name == "Requantize" and sum(n.op_type == "Requantize" for n in proto.graph.node) > 20
        casts = [n for n in function.node if n.op_type == "Cast"]
        assert [a.ref_attr_name for n in casts for a in n.attribute if a.ref_attr_name] == ["to"]
        targets = {a.i for n in casts for a in n.attribute if not a.ref_attr_name}
        assert targets == {onnx.TensorProto.INT64, onnx.TensorProto.UINT64}
        allowed = {"Constant", "Cast", "Pow", "Mul", "Add", "Div", "Sub", "Clip", "BitShift"}
        assert {n.op_type for n in function.node} <= allowed
        # ... and the conv weights uint8 (q + 128, read with zero point 128: onnxruntime's fast ConvInteger) ...
        convs = [n for n in proto.graph.node if n.op_type == "ConvInteger"]
        weights = {t.name: t.data_type for t in proto.graph.initializer}
        assert convs and {weights.get(n.input[1], weights.get(n.input[1][:-2])) for n in convs} == {
            onnx.TensorProto.UINT8}  # the linear's through a Reshape (name.weight4d) of name.weight
        assert all(n.input[3] == "uint8 128" for n in convs)
        # ... so a resolution's graph holds only its tables as stored: int32 m0 and bias, uint8 n per channel.
        per_channel = [t for t in proto.graph.initializer
                       if t.data_location != onnx.TensorProto.EXTERNAL and np.prod(t.dims) > 4]  # not a shape
        assert per_channel and {t.data_type for t in per_channel} == {onnx.TensorProto.INT32, onnx.TensorProto.UINT8}
        r = int(path.stem.split("_r")[1])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = resize_batch(images[0][:64], r).numpy()
        logits, integer_logits = session.run(None, {"input": x})
        assert np.array_equal(integer_logits, reference.run(x, r))
        assert np.allclose(logits, dequantize_logits(reference.model, integer_logits, r))


@pytest.mark.parametrize("bits", BITS)
def test_switchable_onnx_runs_every_resolution_from_one_graph(runs, images, bits):
    folder = runs[bits][1] / "onnx"
    path = folder / "model.onnx"
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto)
    values = [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)
    assert {v.name for v in values if v.type.tensor_type.elem_type in float_types} == {"input", "logits"}
    # The tables that differ by resolution are stacked, one row per resolution, and gathered.
    stacked = [t for t in proto.graph.initializer if t.name.endswith(".modes")]
    assert stacked and all(t.dims[0] == len(RESOLUTIONS) for t in stacked)
    # One graph instead of one per resolution, the weights shared with them.
    per_resolution = sum((folder / f"model_r{r}.onnx").stat().st_size for r in RESOLUTIONS)
    assert path.stat().st_size < 0.75 * per_resolution
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # What an app needs to feed it travels in the file.
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["rsq.resolutions"] == "16,12"
    assert json.loads(meta["rsq.input"])["mean"] == pytest.approx(list(fashion_mnist.MEAN))
    for r in RESOLUTIONS:
        x = resize_batch(images[0][:32], r).numpy()
        one = ort.InferenceSession(str(folder / f"model_r{r}.onnx"), providers=["CPUExecutionProvider"])
        for got, want in zip(session.run(None, {"input": x}), one.run(None, {"input": x})):
            assert np.array_equal(got, want)
    with pytest.raises(Exception, match="out of data bounds"):  # a size that is no exported resolution
        session.run(None, {"input": np.zeros((1, 1, 14, 14), np.float32)})
    with pytest.raises(Exception, match="out of data bounds"):  # nor is a non-square one
        session.run(None, {"input": np.zeros((1, 1, 16, 12), np.float32)})


def test_packed_export_runs_with_torch_blocked(runs, images, tmp_path):
    export = runs[2][1]
    x = resize_batch(images[0][:8], 12).numpy()
    np.save(tmp_path / "x.npy", x)
    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np\nfrom rsq.runtime import Runtime, load\n"
            "np.save(sys.argv[2], Runtime(load(sys.argv[1])).run(np.load(sys.argv[3]), 12))\n")
    done = subprocess.run([sys.executable, "-c", code, str(export / "packed"), str(tmp_path / "out.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(np.load(tmp_path / "out.npy"), Runtime(load(export / "packed")).run(x, 12))


def test_verify_reports_every_artifact(runs, capsys):
    from rsq.runtime.native import find_compiler
    from rsq.verify import verify_export
    result = verify_export(runs[4][1], test_subset=32, latency=False)
    artifacts = {(row["resolution"], row["artifact"]) for row in result["rows"]}
    compiled = ("c",) if find_compiler() else ()
    assert artifacts == {(r, a) for r in RESOLUTIONS
                         for a in ("fake-quant", "runtime", "packed", "onnx", "onnx-switchable", *compiled)}
    assert result["skipped"] == ({} if compiled else {"c": result["skipped"]["c"]})
    for row in result["rows"]:
        if row["artifact"] in ("packed", "onnx", "onnx-switchable", "c"):
            assert row["integers_vs_runtime"] == "identical"
        assert row["agreement"] >= 90
    assert all(result["lowering_unchanged"].values())
    assert "agreement with fake-quant" in capsys.readouterr().out


def test_cli_export_c_states_its_memory_budget(runs, tmp_path, capsys):
    from rsq.cli import main
    assert main(["export", str(runs[2][0]), "--format", "c", "--out", str(tmp_path / "e")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'e' / 'c'} (weights ") and "RAM: 16 px" in line and "12 px" in line


def test_cli_export_qlinear_says_when_it_is_bit_exact(runs, tmp_path, capsys):
    from rsq.cli import main
    assert main(["export", str(runs[2][0]), "--format", "qlinear", "--out", str(tmp_path / "e")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {tmp_path / 'e' / 'qlinear'} (")
    assert "bit-exact only where every conv output is narrow" in line and "rsq verify" in line
