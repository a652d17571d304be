"""Each cause's share of the integer model's flips against the fake-quant model (docs/export.md §9, §11).

Every op of the integer model is fed the fake-quant model's own float64 values, so a flip is counted
where it happens and not carried on. Prints flip counts by cause and top-1 agreement.

    python tools/bench_export_shares.py RUN_DIR N_TEST_IMAGES [WIDE_FRACTION_BITS [MAX_BIAS_SHIFT]]
"""
import sys, copy, collections, torch, numpy as np
torch.set_num_threads(1)
from rsq.checkpoint import load_model
from rsq.convert import using_mode
from rsq.data import fashion_mnist
from rsq.data.multires import resize_batch
import rsq.export.lower as L
from rsq.nn import QuantConv2d, QuantLinear
from rsq.nn.quantizers import integer_range
from rsq.runtime import Runtime

run = sys.argv[1]; n = int(sys.argv[2])
if len(sys.argv) > 3: L.WIDE_FRACTION_BITS = int(sys.argv[3])
if len(sys.argv) > 4: L.MAX_BIAS_SHIFT = int(sys.argv[4])
print(run, "wide fraction bits", L.WIDE_FRACTION_BITS, "max bias shift", L.MAX_BIAS_SHIFT)
model, ckpt = load_model(run)
im = L.lower(model); rt = Runtime(im, gemm="float")
m64 = copy.deepcopy(model).double()
x, y = fashion_mnist.load("test", None)
x = (x[:n].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]; y = y[:n].numpy()
reader = {op.inputs[0]: op.name for op in im.ops if op.kind in ("conv", "linear")}

def chunk_stats(xr, r, counts, agree):
    cap = {}
    hooks = [mod.register_forward_hook(lambda mod, inp, out, name=name: cap.__setitem__(name, inp[0].numpy()))
             for name, mod in m64.named_modules() if isinstance(mod, (QuantConv2d, QuantLinear))]
    with torch.no_grad(), using_mode(m64, r), using_mode(model, r):
        f64 = m64(xr.double()).numpy(); f32 = model(xr).numpy()
    for h in hooks: h.remove()
    tables, scales = im.tables[r], im.scales[r]

    def exact_q(tensor):  # the fake-quant (float64) integers of a narrow tensor, NHWC
        name = reader[tensor]; info = im.tensors[tensor]
        qn, qp = integer_range(info.bits, info.signed)
        step = float(model.get_submodule(name).act_quantizer.step.detach())
        q = np.clip(np.round(cap[name] / step), -qn, qp)
        return q.transpose(0, 2, 3, 1) if q.ndim == 4 else q

    def tally(key, got, want):
        counts[key][0] += int((got != want).sum()); counts[key][1] += got.size

    for op in im.ops:
        if op.kind == "quantize_input":
            tally("input quantization", rt.quantize_input(xr.numpy(), r).transpose(0, 2, 3, 1), exact_q(op.output))
        elif op.kind == "conv" and im.tensors[op.output].kind == "narrow":
            got = rt._run_op(op, tables[op.name], {op.inputs[0]: exact_q(op.inputs[0]).astype(np.int32)})
            tally("conv+BN requantization", got, exact_q(op.output))
        elif op.kind == "requantize":
            wide = np.floor(cap[reader[op.output]] / scales[op.inputs[0]] + 0.5)  # the exact value on the wide grid
            wide = wide.transpose(0, 2, 3, 1) if wide.ndim == 4 else wide
            got = rt._run_op(op, tables[op.name], {op.inputs[0]: wide.astype(np.int64)})
            tally("residual stream (wide) rounding", got, exact_q(op.output))
    logits = rt.run(xr.numpy(), r)
    agree["int=fq32"] += int((logits.argmax(1) == f32.argmax(1)).sum())
    agree["int=fq64"] += int((logits.argmax(1) == f64.argmax(1)).sum())
    agree["fq32=fq64"] += int((f32.argmax(1) == f64.argmax(1)).sum())
    return f32.argmax(1), logits.argmax(1)

for r in im.resolutions:
    counts = collections.defaultdict(lambda: [0, 0]); agree = collections.Counter()
    fq_pred, int_pred = [], []
    for start in range(0, n, 250):
        a, b = chunk_stats(resize_batch(x[start:start + 250], r), r, counts, agree)
        fq_pred.append(a); int_pred.append(b)
    fq_pred, int_pred = np.concatenate(fq_pred), np.concatenate(int_pred)
    print(f"r={r}: top-1 fake-quant {100 * (fq_pred == y).mean():.2f} integer {100 * (int_pred == y).mean():.2f}; "
          f"agreement int/fq32 {100 * agree['int=fq32'] / n:.2f}%  int/fq64 {100 * agree['int=fq64'] / n:.2f}%  "
          f"fq32/fq64 {100 * agree['fq32=fq64'] / n:.2f}%")
    for k, (bad, tot) in counts.items():
        print(f"   {k:34s} {bad:8d} / {tot:10d} = {bad / max(tot, 1):.1e}")
