"""Would oneDNN taking the float residual add pay? A compiled PT2E program with and without it.

rsq's PT2E program keeps the residual stream in float, as the fake-quant model does, so torchao's x86
Inductor passes leave each block's add and ReLU to one of Inductor's elementwise kernels: their
conv + add + ReLU fusion takes the add's other input only from a dequantize
(`_is_valid_quantized_op_binary_optimization_pattern`). oneDNN's int8 conv with a float output can
add any float tensor of its shape ("sum" post-op) and apply the ReLU. This probe registers one more
freezing pattern, for this process only (rsq itself does not), that does exactly that:

    onednn.qconv_pointwise(float out) -> add(other: float) -> relu
        => onednn.qconv2d_pointwise.binary(..., accum=other, "sum", relu)

with the checks torchao makes for in-place accumulation (the conv has one reader; every other reader
of ``other`` runs before the conv). It then compiles the same saved program twice, before and after
registering it, checks that both give the same logits, and times them round-robin in one process
(ResNet-18 W8A8 RS-Net, random weights, batch 32, one thread, freed memory kept as `load_pt2e` does).

    python tools/probe_pt2e_fuse_add.py [--resolution 96] [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name, write_outputs


def register_float_add_fusion() -> list[int]:
    """Register the pattern (both operand orders of the add); returns a one-element counter of fusions."""
    import torch
    from torch._inductor.fx_passes.freezing_patterns import register_freezing_graph_pattern
    from torch._inductor.fx_passes.mkldnn_fusion import _get_remaining_users
    from torch._inductor.pattern_matcher import CallFunction, KeywordArg

    qconv_op = torch.ops.onednn.qconv_pointwise.default
    names = ("x", "x_scale", "x_zp", "packed_weight", "w_scale", "w_zp", "b", "stride", "padding", "dilation",
             "groups", "output_scale", "output_zero_point", "output_dtype", "postop_name", "postop_args",
             "postop_algorithm")
    fused = [0]

    def valid(match) -> bool:
        k = match.kwargs
        conv = next(n for n in match.nodes if n.target is qconv_op)
        accum = k["accum"]
        if k["output_dtype"] != torch.float32 or k["postop_name"] != "none" or not isinstance(accum, torch.fx.Node):
            return False
        a, c = accum.meta.get("val"), conv.meta.get("val")
        if a is None or c is None or a.dtype != torch.float32 or a.shape != c.shape:
            return False
        # oneDNN writes the sum into accum: nothing may read it after the conv.
        return len(_get_remaining_users(accum, conv)) <= 1 and accum is not k["x"]

    def replace(match, *args, **k):
        out = match.output_node()
        with match.graph.inserting_before(out):
            node = match.graph.call_function(torch.ops.onednn.qconv2d_pointwise.binary, args=(
                k["x"], k["x_scale"], k["x_zp"], k["packed_weight"], k["w_scale"], k["w_zp"], k["accum"], k["b"],
                k["stride"], k["padding"], k["dilation"], k["groups"], 1.0, 0, torch.float32, 1.0, 0,
                "sum", 1.0, "relu", [], ""))
        out.replace_all_uses_with(node)
        node.meta.update(out.meta)
        for n in reversed(match.nodes):
            match.graph.erase_node(n)
        fused[0] += 1

    aten = torch.ops.aten
    for swap in (False, True):
        conv = CallFunction(qconv_op, *[KeywordArg(n) for n in names], _users=1)
        add = CallFunction(aten.add.Tensor, *((KeywordArg("accum"), conv) if swap else (conv, KeywordArg("accum"))))
        # after torchao's passes (0-5), so its own fusions always win
        register_freezing_graph_pattern(CallFunction(aten.relu.default, add), extra_check=valid,
                                        pass_number=6)(replace)
    return fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=6, help="round-robin rounds of 5 calls per program")
    parser.add_argument("--out", default="tools/results/probe_pt2e_fuse_add")
    args = parser.parse_args()
    import torch
    from bench_export_extra import resnet18_checkpoint

    from rsq.allocator import keep_freed_memory
    from rsq.checkpoint import load_model
    from rsq.export.pt2e import load_pt2e, write_pt2e

    torch.set_num_threads(1)
    keep_freed_memory()
    r = args.resolution
    work = Path(tempfile.mkdtemp(prefix="probe_pt2e_fuse_add."))
    model, _ = load_model(resnet18_checkpoint(work / "checkpoint.pt", [r], 8, False))
    path = write_pt2e(model, r, 3, work / f"r{r}.pt2")
    x = torch.randn(32, 3, r, r, generator=torch.Generator().manual_seed(0))
    programs = {}
    with torch.no_grad():
        programs["torchao's passes"] = load_pt2e(path)
        reference = programs["torchao's passes"](x)  # compiles before the pattern exists
        fused = register_float_add_fusion()
        # no torch._dynamo.reset(): it would recompile the first program too, now with the pattern
        programs["+ float add in oneDNN"] = load_pt2e(path)
        same = bool(torch.equal(programs["+ float add in oneDNN"](x), reference))
        times = {name: [] for name in programs}
        for _ in range(args.rounds):
            for name, fn in programs.items():
                fn(x)
                began = time.perf_counter()
                for _ in range(5):
                    fn(x)
                times[name].append((time.perf_counter() - began) / 5 * 1000)
    rows = [{"program": name, "ms": statistics.median(ts), "min_ms": min(ts), "max_ms": max(ts)}
            for name, ts in times.items()]
    ratio = statistics.median(b / a for a, b in zip(*times.values()))
    lines = [f"# PT2E + Inductor with the float residual add fused into oneDNN's int8 conv: ResNet-18 W8A8, {r} px",
             "", f"CPU: {cpu_name()}.", "",
             f"`python tools/probe_pt2e_fuse_add.py --resolution {r} --rounds {args.rounds}`: one thread, batch 32, "
             f"random weights; {args.rounds} round-robin rounds of 5 calls per program, one warm-up call before each.",
             "", "| program | ms per call, median | min | max |", "|:---|---:|---:|---:|"]
    lines += [f"| {row['program']} | {row['ms']:.1f} | {row['min_ms']:.1f} | {row['max_ms']:.1f} |" for row in rows]
    lines += ["", f"Blocks whose add and ReLU oneDNN took: {fused[0]}. Logits identical to torchao's passes alone: "
              f"{'yes' if same else 'NO'}. Fused / unfused time, median of the per-round ratios: {ratio:.3f}."]
    write_outputs(args.out, lines, {"resolution": r, "cpu": cpu_name(), "rows": rows, "fused_blocks": fused[0],
                                    "identical": same, "ratio": ratio, "times": times})


if __name__ == "__main__":
    main()
