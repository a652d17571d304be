"""``verify_export(folder)``: run every artifact of an export on the run's test set and compare.

Per resolution and artifact: top-1, top-1 agreement with the fake-quant PyTorch model, the
accuracy difference, the latency at batch 1 and per image at batch 32 (warm: each engine's one-time
work, such as Inductor's compile for a batch size, is done by an untimed call first), and whether its
integer logits equal rsq.runtime's (the reference: the checkpoint lowered again in memory).
Fake-quant vs runtime disagreement is the integer arithmetic's doing; runtime vs an artifact's is the
writer's or the engine's.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .allocator import keep_freed_memory
from .checkpoint import checkpoint_config, load_model
from .convert import using_mode
from .errors import RsqError
from .export import CHECKPOINT_COPY, INTEGER_FORMATS, lower_checkpoint_model, read_export_info
from .latency import median_ms, torch_threads
from .runtime import Runtime, load


def _ort_session(path: Path):
    """An onnxruntime CPU session of one graph, on torch's thread count."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise RsqError("verifying an ONNX export needs onnxruntime: pip install onnxruntime") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _onnx_sessions(folder: Path, resolutions) -> dict:
    """{resolution: onnxruntime session} of an ONNX export's graphs (exact or QLinear)."""
    from .export.onnx import graph_file
    sessions = {}
    for r in resolutions:
        path = folder / graph_file(r)
        if not path.is_file():
            raise RsqError(f"{path} is missing from the export")
        sessions[r] = _ort_session(path)
    return sessions


def _switchable_session(folder: Path):
    """A session of the export's switchable graph (every resolution, picked by the input's size), or None
    for a one-resolution export."""
    from .export.onnx import SWITCHABLE_FILE
    path = folder / SWITCHABLE_FILE
    return _ort_session(path) if path.is_file() else None


def _artifacts(export_dir: Path, info: dict, resolutions, gemm: str, reference, skipped: dict) -> dict:
    """{name: callable(x float32 NCHW numpy, r)} for every format in the folder. A callable returns int32
    logits (held against rsq.runtime's), float logits, or (float logits, (tensor, its integers)) to hold
    that integer tensor against rsq.runtime's. A format that cannot run here goes into ``skipped`` with why."""
    runners = {}
    formats = info.get("formats", {})
    if "packed" in formats:
        packed = Runtime(load(export_dir / "packed"), gemm=gemm)
        runners["packed"] = packed.run
    if "c" in formats:
        from .runtime.native import NativeRuntime, find_compiler
        if find_compiler() is None:
            skipped["c"] = "no C compiler (install one, e.g. apt-get install gcc, or set CC)"
        else:
            runners["c"] = NativeRuntime(export_dir / "c").run
    # Each ONNX format also as its switchable graph, if written: one session fed every resolution.
    for fmt, runner in (("onnx", _integer_logits_runner), ("qlinear", _qlinear_runner)):
        if fmt in formats:
            runners[fmt] = runner(_onnx_sessions(export_dir / fmt, resolutions).get, reference)
            switchable = _switchable_session(export_dir / fmt)
            if switchable is not None:
                runners[f"{fmt}-switchable"] = runner(lambda r, session=switchable: session, reference)
    if "qonnx" in formats:
        runners["qonnx"] = _qonnx_runner(export_dir / "qonnx")
    if "pt2e" in formats:
        from .export import pt2e_file
        from .export.pt2e import load_pt2e
        compiled = {r: load_pt2e(export_dir / "pt2e" / pt2e_file(r)) for r in resolutions}  # Inductor
        runners["pt2e"] = lambda x, r: compiled[r](torch.from_numpy(x)).detach().numpy()
    executorch_formats = [name for name in ("executorch", "executorch-exact") if name in formats]
    if executorch_formats:
        from .export import EXECUTORCH_FILE
        from .export.executorch import ExecutorchProgram, method_name, set_xnnpack_threads
        set_xnnpack_threads(torch.get_num_threads())
    for name in executorch_formats:
        program = ExecutorchProgram(export_dir / name / EXECUTORCH_FILE)
        runners[name] = lambda x, r, program=program: program(method_name(r), x)
    return runners


def _integer_logits_runner(session_for, reference):
    """The exact graph's int32 logits (its output 1; output 0 is their DequantizeLinear) from the session
    ``session_for(resolution)``."""
    def run(x, r):
        session = session_for(r)
        return session.run([session.get_outputs()[1].name], {"input": x})[0]
    return run


def _qlinear_runner(session_for, reference):
    """Float logits, and the last linear's integer input (the same grid as rsq.runtime's), from the QLinear
    session ``session_for(resolution)``."""
    from .export.qlinear import features_tensor, features_zero_point
    features = features_tensor(reference)

    def run(x, r):
        logits, ints = session_for(r).run(None, {"input": x})
        return logits, (features, ints.astype(np.int32) - features_zero_point(reference, r))
    return run


QONNX_IMAGES = 64  # qonnx's executor runs node by node (about 0.3 s an image): verify a sample per resolution


def _qonnx_runner(folder: Path):
    """Float logits from qonnx's reference executor for the first QONNX_IMAGES test images."""
    from .export import qonnx_file
    from .interop.brevitas import QonnxRunner
    runners: dict[int, QonnxRunner] = {}
    seen: dict[int, int] = {}

    def unsampled(x, r):
        if r not in runners:
            runners[r] = QonnxRunner(folder / qonnx_file(r))
        return runners[r](x)

    def run(x, r):
        take = max(0, min(len(x), QONNX_IMAGES - seen.get(r, 0)))
        seen[r] = seen.get(r, 0) + take
        return unsampled(x[:take], r) if take else None
    run.unsampled = unsampled  # the latency pass times it on its own inputs
    return run


LATENCY_BATCH = 32
SLOW_CALL_S = 0.05   # an engine whose one-image call takes longer is timed at batch 1 only (qonnx's executor)


def _latencies(runners: dict, images: dict) -> dict:
    """{(resolution, name): (ms at batch 1, ms per image at batch len(images[r]) or None)}; ``runners[name]``
    is called as run(x, r), once untimed (sessions, method loading, Inductor's compile for this batch size),
    then at least 3 times and more within 0.3 s."""
    timed = {}
    for r, x in images.items():
        for name, run in runners.items():
            call = getattr(run, "unsampled", run)
            one = median_ms(lambda: call(x[:1], r), budget_s=0.3, max_calls=20)
            many = (None if one > 1000 * SLOW_CALL_S else
                    median_ms(lambda: call(x, r), budget_s=0.3, max_calls=20) / len(x))
            timed[r, name] = (round(one, 3), None if many is None else round(many, 3))
    return timed


class _Tally:
    def __init__(self):
        self.correct = self.agree = self.images = 0
        self.int_differ = self.int_within_one = self.int_total = 0
        self.compared = ""  # what the integers compared with rsq.runtime's are: "" (none), "logits", a tensor

    def add(self, pred, target, fq_pred, ints=None, ref_ints=None, what: str = "logits"):
        self.correct += int((pred == target).sum())
        self.agree += int((pred == fq_pred).sum())
        self.images += len(target)
        if ints is not None:
            self.compared = what
            diff = np.abs(ints.astype(np.int64) - ref_ints.astype(np.int64))
            self.int_differ += int((diff != 0).sum())
            self.int_within_one += int((diff <= 1).sum())
            self.int_total += diff.size

    def row(self, resolution, artifact, fq_top1, latency=(None, None)) -> dict:
        top1 = 100.0 * self.correct / max(self.images, 1)
        row = {"resolution": resolution, "artifact": artifact, "top1": round(top1, 2),
               "agreement": round(100.0 * self.agree / max(self.images, 1), 2),
               "top1_diff": round(top1 - fq_top1, 2),
               "ms_batch1": latency[0], "ms_per_image_batch": latency[1],
               "integers_vs_runtime": ""}
        if self.compared:
            # Logits are named only when they are not what is compared (the QLinear graph's are float).
            what = "" if self.compared == "logits" else f"{self.compared}: "
            row["integers_vs_runtime"] = (f"{what}identical" if self.int_differ == 0 else
                                          f"{what}{self.int_differ}/{self.int_total} differ, "
                                          f"{100.0 * self.int_within_one / self.int_total:.2f}% within one step")
        return row


def verify_export(export_dir, test_subset: Optional[int] = None, data_dir: Optional[str] = None,
                  quiet: bool = False, gemm: str = "float", latency: bool = True,
                  threads: Optional[int] = None) -> dict:
    """{"images", "rows", "lowering_unchanged", "latency_batch", "latency_threads"}; also prints the table
    unless ``quiet``.

    gemm: rsq.runtime's matmul ("float": exact float32 BLAS where provably exact, several times
    faster; "int32": int32 throughout). Both give the same integers (tests/test_export_models.py).
    latency: time every engine at batch 1 and at batch LATENCY_BATCH (the first test images; fewer when the
    test set is smaller), warm, on the threads this process has; False leaves the two columns empty.
    threads: run every engine on this many threads (torch's count, which the onnxruntime sessions and
    Inductor's kernels take, and XNNPACK's pool); by default torch's count as it is.
    """
    with torch_threads(threads):
        return _verify_export(export_dir, test_subset, data_dir, quiet, gemm, latency)


def _verify_export(export_dir, test_subset, data_dir, quiet: bool, gemm: str, latency: bool) -> dict:
    # Before anything is timed, so every format runs with the allocator the PT2E server path sets.
    keep_freed_memory()
    export_dir = Path(export_dir)
    info = read_export_info(export_dir)
    model, ckpt = load_model(export_dir / info.get("checkpoint", CHECKPOINT_COPY))
    resolutions = list(info["resolutions"])
    bits = info.get("bits")
    reference = lower_checkpoint_model(model, checkpoint_config(ckpt), resolutions, bits)
    unchanged = {fmt: entry.get("digest") == reference.digest() for fmt, entry in info.get("formats", {}).items()
                 if fmt in INTEGER_FORMATS}  # the other formats are not written from the IntegerModel
    runtime = Runtime(reference, gemm=gemm)
    skipped: dict[str, str] = {}
    artifacts = _artifacts(export_dir, info, resolutions, gemm, reference, skipped)
    test = _test_data(ckpt, resolutions, test_subset, data_dir)
    names = ["fake-quant", "runtime"] + list(artifacts)
    tallies = {(r, name): _Tally() for r in resolutions for name in names}
    first: dict[int, np.ndarray] = {}  # the first LATENCY_BATCH test images per resolution, for the latency pass

    def fake_quant(x, r):
        with using_mode(model, r, bits):
            return model(torch.from_numpy(x)).numpy()

    with torch.no_grad():
        for xs, target in test.batches():
            target = target.numpy()
            for r in resolutions:
                x = xs[r].numpy().astype(np.float32)
                if len(first.get(r, ())) < LATENCY_BATCH:
                    first[r] = np.concatenate([first.get(r, x[:0]), x])[:LATENCY_BATCH]
                fq_pred = fake_quant(x, r).argmax(1)
                tallies[r, "fake-quant"].add(fq_pred, target, fq_pred)
                ref_values = runtime.run_all(x, r)
                ref_ints = ref_values[reference.output]
                tallies[r, "runtime"].add(ref_ints.argmax(1), target, fq_pred)
                for name, run in artifacts.items():
                    out = run(x, r)
                    if out is None:  # a sampled artifact that has seen its share
                        continue
                    if isinstance(out, tuple):  # float logits and one integer tensor to compare
                        out, (tensor, ints) = out
                        tallies[r, name].add(out.argmax(1), target, fq_pred, ints, ref_values[tensor], what=tensor)
                        continue
                    n = len(out)
                    if np.issubdtype(out.dtype, np.integer):  # integer logits: compare them with the runtime's
                        tallies[r, name].add(out.argmax(1), target, fq_pred, out, ref_ints)
                    else:
                        tallies[r, name].add(out.argmax(1), target[:n], fq_pred[:n])
        timed = _latencies({"fake-quant": fake_quant, "runtime": runtime.run, **artifacts}, first) if latency else {}
    rows = []
    for r in resolutions:
        fq = tallies[r, "fake-quant"]
        fq_top1 = 100.0 * fq.correct / max(fq.images, 1)
        rows += [tallies[r, name].row(r, name, fq_top1, timed.get((r, name), (None, None))) for name in names]
    result = {"images": tallies[resolutions[0], "fake-quant"].images, "rows": rows, "lowering_unchanged": unchanged,
              "skipped": skipped, "latency_batch": len(first[resolutions[0]]) if latency and first else None,
              "latency_threads": torch.get_num_threads() if latency else None, "bias_snap": info.get("bias_snap")}
    if not quiet:
        print(format_verify_table(result))
    return result


def _test_data(ckpt: dict, resolutions, test_subset, data_dir):
    from .data import build_data
    config = checkpoint_config(ckpt)
    given = {"test_subset": test_subset, "data_dir": data_dir}
    config = config.replace(resolutions=list(resolutions), **{k: v for k, v in given.items() if v is not None})
    return build_data(config, train=False).test


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_verify_table(result: dict) -> str:
    batch = result.get("latency_batch")
    lines = [f"{result['images']} test images" + (
                 f"; latency warm, on {result.get('latency_threads')} thread(s), batch 1 and {batch} "
                 "(the first test images)"
                 if batch else ""),
             "| resolution | artifact | top-1 | agreement with fake-quant | top-1 diff | ms, batch 1 "
             f"| ms / image, batch {batch or LATENCY_BATCH} | integers vs runtime |",
             "|---:|:---|---:|---:|---:|---:|---:|:---|"]
    for row in result["rows"]:
        lines.append(f"| {row['resolution']} | {row['artifact']} | {row['top1']:.2f} | {row['agreement']:.2f} | "
                     f"{row['top1_diff']:+.2f} | {_ms(row.get('ms_batch1'))} | {_ms(row.get('ms_per_image_batch'))} | "
                     f"{row['integers_vs_runtime']} |")
    lines += [f"{fmt}: skipped, {why}" for fmt, why in result.get("skipped", {}).items()]
    if batch and any(row.get("ms_batch1") is not None and row.get("ms_per_image_batch") is None
                     for row in result["rows"]):
        lines.append(f"note: '-' at batch {batch}: an engine whose one-image call took over "
                     f"{1000 * SLOW_CALL_S:.0f} ms is timed at batch 1 only")
    if any(row["artifact"].startswith("qlinear") and row["integers_vs_runtime"]
           and not row["integers_vs_runtime"].endswith("identical")
           for row in result["rows"]):
        lines.append("note: qlinear differs from rsq.runtime by design: its residual stream is 8-bit, and "
                     "onnxruntime's kernels take each conv's bias in whole accumulator units, so a conv with no exact "
                     "fit keeps only the rounding boundaries most values sit at (docs/export.md §8a, §8c); "
                     "the onnx format is the bit-exact graph")
    snap = result.get("bias_snap") or {}
    if snap.get("convs"):
        lines.append(f"note: fake-quant is the exported model (the export's checkpoint.pt): {snap['convs']} convs' "
                     f"BatchNorm shifts moved by at most {snap['largest_move']:.2f} of an int8 kernel's accumulator "
                     "unit, so their biases sit on that kernel's grid (docs/export.md §8d)")
    stale = [fmt for fmt, same in result["lowering_unchanged"].items() if not same]
    if stale:
        lines.append(f"note: lowering the checkpoint now gives a different integer model than the {', '.join(stale)} "
                     f"export (rsq changed since it was written)")
    return "\n".join(lines)
