"""The QLinear ONNX export: onnxruntime's fused 8-bit operators, weights shared with the exact export."""
import json

import numpy as np
import pytest
import torch

from rsq.config import TrainConfig
from rsq.data import fashion_mnist
from rsq.data.multires import resize_batch
from rsq.export import export_checkpoint
from rsq.export.qlinear import features_tensor, features_zero_point
from rsq.runtime import Runtime, load
from rsq.train import train

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLUTIONS = [16, 12]
# Every op the QLinear graph may hold: 8-bit kernels, integer glue, and the float edges.
ALLOWED_OPS = {"QuantizeLinear", "QLinearConv", "Clip", "QLinearAdd", "QLinearGlobalAveragePool", "MaxPool",
               "Flatten", "QGemm"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlinear")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = TrainConfig(weight_bits=4, act_bits=4, subset=768, test_subset=64, epochs=1, resolutions=RESOLUTIONS,
                         batch_size=64, lr=0.05, out=str(root / "run"), device="cpu")
    train(config, overwrite=True)
    for fmt in ("packed", "onnx", "qlinear"):
        export_checkpoint(root / "run", fmt, root / "export")
    torch.set_num_threads(threads)
    return root / "export"


@pytest.fixture(scope="module")
def images():
    x, _ = fashion_mnist.load("test", None)
    return (x[:128].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]


def _every_tensor(path):
    """The model with every node output made a graph output, so onnxruntime reports each one's type."""
    proto = onnx.load(str(path))
    known = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for o in node.output if o not in known)
    return proto


def test_qlinear_graph_is_8bit_and_stores_the_weights_once(export, images):
    folder = export / "qlinear"
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "model_r12.onnx", "model_r16.onnx",
                                                        "ranges.json", "weights.bin"]
    # The exact export's weights: as they are at 8 bits, moved 4 bits up inside int8 at 4 bits (weight_shifts).
    model = load(export / "packed")
    assert (folder / "weights.bin").stat().st_size == (export / "onnx" / "weights.bin").stat().st_size
    proto = onnx.load(str(folder / "model_r16.onnx"))
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith(".weight")}
    assert np.array_equal(stored["conv1.weight"], model.weights["conv1"].values)  # 8-bit input and weights
    assert np.array_equal(stored["layer1.0.conv1.weight"], model.weights["layer1.0.conv1"].values.astype(np.int8) * 16)
    ranges = json.loads((folder / "ranges.json").read_text())
    assert sorted(ranges) == ["12", "16"] and all(v > 0 for r in ranges.values() for v in r.values())
    for r in RESOLUTIONS:
        path = folder / f"model_r{r}.onnx"
        onnx.checker.check_model(str(path))
        proto = onnx.load(str(path), load_external_data=False)
        assert {node.op_type for node in proto.graph.node} <= ALLOWED_OPS
        assert sum(node.op_type == "QLinearConv" for node in proto.graph.node) == 21  # ResNet-20: 19 + 2 shortcuts
        # A requantize of the (>= 0) residual onto a 4-bit grid clamps by uint8 saturation: no Clip after it.
        rescaled = {node.output[0] for node in proto.graph.node if node.op_type == "QLinearAdd" and node.input[3] == "zero"}
        assert len(rescaled) == 11 and not [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] in rescaled]
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"weights.bin"}
        session = ort.InferenceSession(_every_tensor(path).SerializeToString(), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"input": resize_batch(images[:4], r).numpy()})
        dtypes = {o.name: v.dtype for o, v in zip(session.get_outputs(), outputs)}
        floats = {name for name, dtype in dtypes.items() if dtype.kind == "f"}
        assert floats == {"logits"}  # and the graph input: nothing else between quantize and dequantize
        assert {dtype for name, dtype in dtypes.items() if name not in floats} <= {np.dtype(t) for t in
                                                                                   ("uint8", "int8", "int32")}


def test_switchable_qlinear_runs_every_resolution_from_one_session(export, images):
    folder = export / "qlinear"
    path = folder / "model.onnx"
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    # The weights once, outside the branches; each branch is a resolution's graph with its own tables.
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == 21 + 1 and not [t for n in proto.graph.node for a in n.attribute if a.type == a.GRAPH
                                            for t in a.g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    branches = [n for n in proto.graph.node if n.op_type == "If"]
    assert len(branches) == len(RESOLUTIONS)
    for node in branches:
        then = next(a.g for a in node.attribute if a.name == "then_branch")
        assert {n.op_type for n in then.node} <= ALLOWED_OPS and sum(n.op_type == "QLinearConv" for n in then.node) == 21
    # Numbered tensors in the branches (each repeats every name): smaller than the readable graphs together.
    per_resolution = sum((folder / f"model_r{r}.onnx").stat().st_size for r in RESOLUTIONS)
    assert path.stat().st_size < 0.8 * per_resolution, (path.stat().st_size, per_resolution)
    then = next(a.g for a in branches[0].attribute if a.name == "then_branch")
    assert [o.name for o in then.output] == ["r16/logits", f"r16/{features_tensor(load(export / 'packed'))}.flat"]
    assert max(len(t.name) for t in then.initializer) <= len("r16/") + 2
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["rsq.resolutions"] == "16,12"
    for r in RESOLUTIONS:
        x = resize_batch(images[:16], r).numpy()
        one = ort.InferenceSession(str(folder / f"model_r{r}.onnx"), providers=["CPUExecutionProvider"])
        for got, want in zip(session.run(None, {"input": x}), one.run(None, {"input": x})):
            assert got.shape == want.shape and np.array_equal(got, want)
    with pytest.raises(Exception, match="out of data bounds"):  # a size that is no exported resolution
        session.run(None, {"input": np.zeros((1, 1, 14, 14), np.float32)})


def test_qlinear_ops_stay_within_one_step_of_the_runtime(export, images):
    """The stem conv's 8-bit output read back onto layer1's grid is rsq.runtime's integer or one step off;
    layer1.0.conv1, fed that, at most two. Deeper, the 8-bit residual grids' rounding is carried on (a few
    steps on this 12-step model), and the class mostly stays."""
    reference = Runtime(load(export / "packed"))
    model = reference.model
    for r in RESOLUTIONS:
        proto = _every_tensor(export / "qlinear" / f"model_r{r}.onnx")
        initializers = {t.name: t for t in proto.graph.initializer}
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        x = resize_batch(images, r).numpy()
        outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"input": x})))
        values = reference.run_all(x, r)
        for tensor, most, identical in (("layer1.0.conv1.input", 1, 0.98), ("layer1.0.conv1", 2, 0.9)):
            zero = onnx.numpy_helper.to_array(initializers[f"{tensor}.q_zero"])  # 240 for [0, 15] read back (saturation clamps)
            ints = outputs[tensor].astype(np.int64).transpose(0, 2, 3, 1) - zero  # NCHW -> rsq.runtime's NHWC
            diff = np.abs(ints - values[tensor])
            assert diff.max() <= most and (diff == 0).mean() >= identical, (r, tensor, diff.max(), (diff == 0).mean())
        features = outputs[features_tensor(model) + ".flat"].astype(np.int64) - features_zero_point(model, r)
        assert np.abs(features - values[features_tensor(model)]).mean() < 1.5
        agree = (outputs["logits"].argmax(1) == values[model.output].argmax(1)).mean()
        assert agree >= 0.7, (r, agree)


def test_qlinear_convs_with_a_narrow_output_give_the_runtime_integers(export, images):
    """Each QLinearConv whose output is narrow (a block's first conv), fed rsq.runtime's integer input, gives
    rsq.runtime's integers in onnxruntime: its per-channel scale and bias are fitted (requant_fit), not the
    bias rounded to the accumulator unit."""
    reference = Runtime(load(export / "packed"))
    model = reference.model
    r = RESOLUTIONS[0]
    values = reference.run_all(resize_batch(images, r).numpy(), r)
    proto = onnx.load(str(export / "qlinear" / f"model_r{r}.onnx"))  # with the weights from weights.bin
    initializers = {t.name: t for t in proto.graph.initializer}
    helper, checked = onnx.helper, 0
    for op in model.ops:
        if op.kind != "conv" or model.tensors[op.output].kind != "narrow":
            continue
        conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv" and n.output[0].startswith(op.output))
        nodes = [conv] + [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] == conv.output[0]]
        graph = helper.make_graph(
            nodes, "one_conv", [helper.make_tensor_value_info(conv.input[0], onnx.TensorProto.UINT8, None)],
            [helper.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.UINT8, None)],
            [initializers[name] for n in nodes for name in n.input[1:] if name in initializers])
        one = helper.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
        x_zero = int(onnx.numpy_helper.to_array(initializers[conv.input[2]]))
        y_zero = int(onnx.numpy_helper.to_array(initializers[conv.input[7]]))
        x = (values[op.inputs[0]].transpose(0, 3, 1, 2) + x_zero).astype(np.uint8)
        got = session.run(None, {conv.input[0]: x})[0].astype(np.int64).transpose(0, 2, 3, 1) - y_zero
        assert np.array_equal(got, values[op.output]), op.name
        checked += 1
    assert checked == 9  # ResNet-20: each block's first conv


def test_qlinear_without_its_data_is_one_clear_error(export, tmp_path):
    from rsq.checkpoint import load_checkpoint
    from rsq.errors import RsqError
    ckpt = load_checkpoint(export / "checkpoint.pt")
    ckpt["config"] = {**ckpt["config"], "data_dir": str(tmp_path / "gone")}
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(RsqError, match="gone"):
        export_checkpoint(tmp_path / "moved.pt", "qlinear", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verify_compares_qlinear_features_with_the_runtime(export):
    from rsq.verify import format_verify_table, verify_export
    result = verify_export(export, test_subset=32, quiet=True, latency=False)
    rows = [row for row in result["rows"] if row["artifact"] == "qlinear"]
    assert [row["resolution"] for row in rows] == RESOLUTIONS
    switchable = [row for row in result["rows"] if row["artifact"] == "qlinear-switchable"]
    assert [(row["top1"], row["agreement"], row["integers_vs_runtime"]) for row in switchable] == [
        (row["top1"], row["agreement"], row["integers_vs_runtime"]) for row in rows]
    for row in rows:
        assert row["integers_vs_runtime"].startswith(features_tensor(load(export / "packed")) + ":")
        assert row["agreement"] >= 50  # far above chance (10 classes); this 12-step model has many near-ties
    differ = any(not row["integers_vs_runtime"].endswith("identical") for row in rows)
    assert ("qlinear differs from rsq.runtime by design" in format_verify_table(result)) == differ


def test_verify_times_every_engine_warm_at_batch_1_and_32(export):
    from rsq.verify import format_verify_table, verify_export
    before = torch.get_num_threads()
    result = verify_export(export, test_subset=32, quiet=True, threads=1)
    assert result["latency_batch"] == 32 and result["latency_threads"] == 1
    assert torch.get_num_threads() == before  # the caller's count is back
    for row in result["rows"]:  # fake-quant, runtime and every artifact: all fast enough for both batches
        assert row["ms_batch1"] > 0 and row["ms_per_image_batch"] > 0, row
    table = format_verify_table(result)
    assert "| ms, batch 1 | ms / image, batch 32 |" in table and "latency warm, on 1 thread(s)" in table
    untimed = verify_export(export, test_subset=32, quiet=True, latency=False)
    assert untimed["latency_batch"] is None
    assert all(row["ms_batch1"] is None and row["ms_per_image_batch"] is None for row in untimed["rows"])
    assert [row["agreement"] for row in untimed["rows"]] == [row["agreement"] for row in result["rows"]]
    assert "| - | - |" in format_verify_table(untimed)


def test_verify_times_a_slow_engine_at_batch_1_only_and_says_so():
    import time

    from rsq.verify import SLOW_CALL_S, _latencies, format_verify_table
    calls = []

    def slow(x, r):
        calls.append(len(x))
        time.sleep(SLOW_CALL_S * 1.2)

    timed = _latencies({"slow": slow, "fast": lambda x, r: calls.append(-len(x))}, {12: np.zeros((32, 1, 12, 12))})
    one, many = timed[12, "slow"]
    assert one >= 1000 * SLOW_CALL_S and many is None and set(calls) == {1, -1, -32}  # slow never ran batch 32
    assert timed[12, "fast"][1] is not None
    row = {"resolution": 12, "artifact": "slow", "top1": 0.0, "agreement": 0.0, "top1_diff": 0.0,
           "ms_batch1": one, "ms_per_image_batch": None, "integers_vs_runtime": ""}
    table = format_verify_table({"images": 32, "rows": [row], "latency_batch": 32, "latency_threads": 1,
                                 "lowering_unchanged": {}})
    assert "timed at batch 1 only" in table.splitlines()[-1]
