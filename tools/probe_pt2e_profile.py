"""Where a compiled PT2E program spends its time: oneDNN's int8 convolutions against Inductor's own kernels.

For each model at one resolution (ResNet-18, batch 32, random weights, one thread, freed memory kept as
`rsq.export.pt2e.load_pt2e` does): eager fp32 and compiled times (5 calls each after 3 warm-up calls),
then torch.profiler over 3 compiled calls, split into
- oneDNN's int8 convolutions (``onednn::qconv_pointwise``, with or without a fused add),
- the logits (``onednn::qlinear_pointwise``),
- Inductor's generated kernels (the self time of the compiled graph: elementwise work left unfused),
- everything else the profiler saw (dispatch, allocation).

Models: rsq W8A8 (float residual stream, as the paper and rsq's recipes), rsq W8A8 trained with
--quantized-shortcut, and the stock torchvision ResNet-18 through torchao's x86 int8 recipe.

    python tools/probe_pt2e_profile.py [--resolution 96] [--out tools/results/probe_pt2e_profile]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name, write_outputs

PARTS = {"int8 convs": ("qconv",), "logits": ("qlinear",), "Inductor kernels": ("CompiledFxGraph",)}


def pairs(name: str, resolution: int, work: Path):
    from bench_pt2e_server import rsq_pairs, stock_pairs
    if name == "stock":
        return stock_pairs([resolution])
    return rsq_pairs(8, [resolution], work, shortcut=name == "rsq W8A8, quantized shortcut")


def split(profile) -> dict[str, float]:
    """Self CPU ms per call of each PART and of the rest (3 profiled calls)."""
    shares = dict.fromkeys([*PARTS, "other"], 0.0)
    for event in profile.key_averages():
        part = next((part for part, keys in PARTS.items() if any(key in event.key for key in keys)), "other")
        shares[part] += event.self_cpu_time_total / 1000 / 3
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=96)
    parser.add_argument("--out", default="tools/results/probe_pt2e_profile")
    args = parser.parse_args()
    import torch

    from rsq.allocator import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    r, rows = args.resolution, []
    work = Path(tempfile.mkdtemp(prefix="probe_pt2e_profile."))
    for name in ("rsq W8A8", "rsq W8A8, quantized shortcut", "stock"):
        for _, eager, compiled in pairs(name, r, work):
            x = torch.randn(32, 3, r, r)
            with torch.no_grad():
                for _ in range(3):
                    eager(x), compiled(x)
                times = {}
                for label, fn in (("eager", eager), ("compiled", compiled)):
                    began = time.perf_counter()
                    for _ in range(5):
                        fn(x)
                    times[label] = (time.perf_counter() - began) / 5 * 1000
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                    for _ in range(3):
                        compiled(x)
            rows.append({"model": name, "eager_ms": times["eager"], "compiled_ms": times["compiled"],
                         **split(profile)})
            print(rows[-1], flush=True)
    lines = [f"# Where PT2E + Inductor spends its time: ResNet-18, {r} px, batch 32, one thread", "",
             f"CPU: {cpu_name()}.", "", f"`python tools/probe_pt2e_profile.py --resolution {r}`", "",
             "| model | eager fp32 (ms) | compiled (ms) | speed-up | " + " | ".join(f"{p} (ms)" for p in [*PARTS, "other"]) + " |",
             "|:---|" + "---:|" * (4 + len(PARTS))]
    for row in rows:
        lines.append(f"| {row['model']} | {row['eager_ms']:.1f} | {row['compiled_ms']:.1f} | "
                     f"{row['eager_ms'] / row['compiled_ms']:.2f}x | "
                     + " | ".join(f"{row[p]:.1f}" for p in [*PARTS, "other"]) + " |")
    lines += ["", "Parts: self CPU time per call under torch.profiler (3 calls), which adds its own overhead; "
              "\"Inductor kernels\" is the compiled graph's self time, the elementwise work oneDNN did not fuse."]
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
