"""One resolution of an LSQ RS-Net as a torchao PT2E quantized program (q/dq ops around float ops).

The float model keeps rsq's numbers: each conv's weight is its fake-quantized weight with that
resolution's BN folded in, and a Quantizer of our own puts rsq's learned steps on every conv /
linear input and weight through fixed-qparams observers, so nothing is re-calibrated.

Grid mapping (8-bit containers; the integers stay rsq's, shifted by the zero point):
- activations, backend "x86" (oneDNN int8 convs take uint8 inputs only): uint8, zero point Qn,
  range [0, Qn + Qp]; an unsigned sub-8-bit grid read from a ReLU's output: zero point 255 - Qp,
  so uint8's saturation at 255 is the clamp at Qp (no hardtanh; LayerGrid.saturates).
  Backend "xnnpack" (its static int8 ops take int8 only): signed -> zero point 0, range [-Qn, Qp];
  unsigned b < 8 -> zero point 0, range [0, Qp]; unsigned 8-bit -> zero point -128, range
  [-128, 127]. Where the range is narrower than the container a float hardtanh clips first
  (clamp_to_grids: int8 kernels ignore quant_max).
- weights: int8 per output channel (ch_axis 0, per_channel_symmetric), scale = step * |BN gain|;
  a negative BN gain flips a channel's integers to [-Qp, Qn]. Linears declare rsq's range
  [-Qn, Qp]; convs declare [-128, 127] (see _fold_layer). Backend "xnnpack" stores each channel's
  integers shifted left by k bits, scale / 2**k, range [-128, 127] (xnnpack_weight_scale): the same
  real weights, a finer accumulator unit for the bias XNNPACK rounds to int32, positive scales only;
  a requantized conv's scale and bias are then fitted so that XNNPACK's rounding is rsq.runtime's
  (fit_xnnpack_requantization).
Residual adds, pooling and the logits stay float, exactly as in the fake-quant model. With quantized
shortcuts (rsq/nn/residual.py) a block's input is one quantized tensor: its conv1 owns the grid, and the
downsample conv and the add's shortcut input share that one q/dq (SharedQuantizationSpec), so Inductor
fuses the second conv, the add and the ReLU into one int8 conv, as in torchao's own recipe.

Every reader of a tensor gets its own q/dq with its own step (allow_implicit_sharing=False): torchao
otherwise shares the first reader's observer with every other reader whose spec has the same dtype
and range, without comparing scales, so a block's conv1 was quantized with its downsample conv's
step whenever no clamp separates them (8-bit grids). That, not float rounding, was the W8A8 gap.
What remains is float32 noise: the folded BN and the quantize op's multiplication by 1 / step move
a value that sits within ~1e-5 of a step of a rounding boundary (a few in a million).

The package, in the order the export runs: float_model.py (BN folded, rsq's grids per layer: grids.py),
xnnpack.py (XNNPACK's weight shift and requantization fit), graph.py and quantizer.py (the exported graph's
clamps and rsq's Quantizer), program.py (export, convert, save, load and compile).
"""
from .float_model import float_model_for
from .graph import clamp_to_grids, int8_weighted, unfold_float_layers
from .grids import BACKENDS, INT8_MAX, INT8_MIN, LayerGrid, activation_dtype, activation_qparams, container_range
from .program import load_pt2e, to_pt2e, write_pt2e
from .quantizer import make_quantizer
from .xnnpack import fit_xnnpack_requantization, lowered, weight_shift, xnnpack_weight_scale

__all__ = ["BACKENDS", "INT8_MAX", "INT8_MIN", "LayerGrid", "activation_dtype", "activation_qparams", "clamp_to_grids",
           "container_range", "fit_xnnpack_requantization", "float_model_for", "int8_weighted", "load_pt2e", "lowered",
           "make_quantizer", "to_pt2e", "unfold_float_layers", "weight_shift", "write_pt2e", "xnnpack_weight_scale"]
