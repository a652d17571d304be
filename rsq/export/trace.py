"""The fake-quant model as a short list of float ops (conv+BN+ReLU fused), found with torch.fx.

Only what integer export can lower is accepted: quantized conv / linear, BatchNorm right after a
conv, ReLU / ReLU6 right after a conv, linear or add, residual adds, a quantizer applied to a
block's input (quantized shortcuts, rsq/nn/residual.py), max pooling, global average pooling,
flatten and dropout. Anything else is an RsqError naming the layer.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ..errors import RsqError
from ..nn.quant_layers import QuantConv2d, QuantLinear
from ..nn.quantizers import LQNetQuantizer, LSQQuantizer, SwitchableQuantizer
from ..nn.switchable_bn import SwitchableBatchNorm2d

INPUT = "input"
_BN_TYPES = (SwitchableBatchNorm2d, nn.BatchNorm2d)
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
_ADD_FUNCTIONS = (operator.add, torch.add)
_FLATTEN_FUNCTIONS = (torch.flatten,)
_QUANTIZER_TYPES = (LSQQuantizer, LQNetQuantizer, SwitchableQuantizer)


@dataclass
class FloatOp:
    kind: str                 # conv, linear, quantize, add, max_pool, global_avg_pool
    name: str                 # the module's qualified name, or the fx node's name
    inputs: list[str]
    output: str
    module: Optional[nn.Module] = None
    bn: Optional[nn.Module] = None
    act: Optional[str] = None  # None, "relu" or "relu6"
    node: str = ""             # the fx node that produced the op (for shapes)
    attrs: Optional[dict] = None  # max_pool: kernel, stride, padding


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # Our layers keep their mode lookups inside (a traced SwitchableBatchNorm2d would bake in
        # the current mode's key).
        if isinstance(m, (QuantConv2d, QuantLinear, nn.Conv2d, nn.Linear) + _BN_TYPES + _QUANTIZER_TYPES):
            return True
        return super().is_leaf_module(m, qualname)


def _unsupported(what: str) -> RsqError:
    return RsqError(f"integer export does not support {what}")


def trace_graph(model: nn.Module) -> torch.fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx fails on data-dependent control flow with many types
        raise RsqError(f"integer export could not trace {type(model).__name__}: {str(exc).splitlines()[0]}") from None


def trace_float_ops(model: nn.Module, graph: torch.fx.Graph) -> list[FloatOp]:
    """Float ops in execution order; values are named by the op that produces them."""
    modules = dict(model.named_modules())
    ops: list[FloatOp] = []
    value_of: dict[str, str] = {}        # fx node name -> value name
    producer: dict[str, FloatOp] = {}    # value name -> op producing it

    def value(node) -> str:
        if not isinstance(node, torch.fx.Node) or node.name not in value_of:
            raise _unsupported(f"the operand {node!r} (only tensors produced by supported layers)")
        return value_of[node.name]

    def fuse_into(node, arg, what: str) -> FloatOp:
        """The op producing ``arg`` if ``node`` (a BN or activation) can be folded into it."""
        op = producer.get(value_of.get(getattr(arg, "name", None), ""))
        if op is None or len(arg.users) != 1:
            raise _unsupported(f"{what} at {node.name} (only right after a conv/linear/add with no other user)")
        return op

    for node in graph.nodes:
        if node.op == "placeholder":
            value_of[node.name] = INPUT
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, torch.fx.Node):
                raise _unsupported("a model with several outputs")
            ops.append(FloatOp("output", "output", [value(out)], value(out)))
        elif node.op == "get_attr":
            raise _unsupported(f"tensor constant {node.target}")
        elif node.op == "call_module":
            _module_node(node, modules[node.target], ops, value_of, producer, value, fuse_into)
        elif node.op in ("call_function", "call_method"):
            _function_node(node, ops, value_of, producer, value, fuse_into)
    return ops


def _new_op(op: FloatOp, node, ops, value_of, producer) -> None:
    ops.append(op)
    value_of[node.name] = op.output
    producer[op.output] = op


def _module_node(node, module, ops, value_of, producer, value, fuse_into) -> None:
    name = node.target
    arg = node.args[0]
    if isinstance(module, (QuantConv2d, QuantLinear)):
        kind = "conv" if isinstance(module, QuantConv2d) else "linear"
        _new_op(FloatOp(kind, name, [value(arg)], name, module=module), node, ops, value_of, producer)
    elif isinstance(module, _QUANTIZER_TYPES):
        # A block input quantized once for all its readers; the layers among them skip their own quantizer.
        _new_op(FloatOp("quantize", name, [value(arg)], name, module=module), node, ops, value_of, producer)
    elif isinstance(module, (nn.Conv2d, nn.Linear)):
        raise RsqError(f"layer {name} is not quantized (full precision); integer export needs every conv and linear "
                       f"quantized (train with --first-last 8 or same)")
    elif isinstance(module, _BN_TYPES):
        op = fuse_into(node, arg, f"BatchNorm {name}")
        if op.kind != "conv" or op.bn is not None or op.act is not None:
            raise _unsupported(f"BatchNorm {name} after {op.name} (only right after a conv)")
        op.bn = module
        value_of[node.name] = op.output
    elif type(module) in (nn.ReLU, nn.ReLU6):
        _activation(node, arg, "relu" if type(module) is nn.ReLU else "relu6", value_of, fuse_into)
    elif isinstance(module, nn.AdaptiveAvgPool2d):
        if module.output_size not in (1, (1, 1)):
            raise _unsupported(f"adaptive pooling {name} to {module.output_size} (only global, output size 1)")
        _new_op(FloatOp("global_avg_pool", name, [value(arg)], name, node=node.name), node, ops, value_of, producer)
    elif isinstance(module, nn.MaxPool2d):
        attrs = _max_pool_attrs(name, module.kernel_size, module.stride, module.padding, module.dilation,
                                module.ceil_mode, module.return_indices)
        _new_op(FloatOp("max_pool", name, [value(arg)], name, attrs=attrs), node, ops, value_of, producer)
    elif isinstance(module, (nn.Dropout, nn.Identity, nn.Flatten)):
        if isinstance(module, nn.Flatten):
            _check_flatten(node, arg, producer, value_of)
        value_of[node.name] = value(arg)
    else:
        raise _unsupported(f"layer {name} ({type(module).__name__})")


def _activation(node, arg, act: str, value_of, fuse_into) -> None:
    op = fuse_into(node, arg, f"{act} {node.name}")
    if op.kind not in ("conv", "linear", "add") or op.act is not None:
        raise _unsupported(f"{act} {node.name} after {op.name}")
    op.act = act
    value_of[node.name] = op.output


def _check_flatten(node, arg, producer, value_of) -> None:
    op = producer.get(value_of.get(getattr(arg, "name", None), ""))
    if op is None or op.kind != "global_avg_pool":
        raise _unsupported(f"flatten {node.name} (only after global average pooling)")


def _function_node(node, ops, value_of, producer, value, fuse_into) -> None:
    target = node.target
    args = node.args
    if target in _RELU_FUNCTIONS or target in ("relu", "relu_"):
        _activation(node, args[0], _RELU_FUNCTIONS.get(target, "relu"), value_of, fuse_into)
    elif target in _ADD_FUNCTIONS or target in ("add", "add_", operator.iadd):
        if len(args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in args):
            raise _unsupported(f"add {node.name} (only the sum of two tensors)")
        op = FloatOp("add", node.name, [value(args[0]), value(args[1])], node.name)
        _new_op(op, node, ops, value_of, producer)
    elif target in _FLATTEN_FUNCTIONS or target == "flatten":
        _check_flatten(node, args[0], producer, value_of)
        value_of[node.name] = value(args[0])
    elif target is F.adaptive_avg_pool2d and args[1:] in ((1,), ((1, 1),)):
        _new_op(FloatOp("global_avg_pool", node.name, [value(args[0])], node.name, node=node.name), node, ops,
                value_of, producer)
    elif target in (F.max_pool2d, torch.max_pool2d):
        params = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"), args[1:]))
        params.update(node.kwargs)
        attrs = _max_pool_attrs(node.name, params["kernel_size"], params.get("stride"), params.get("padding", 0),
                                params.get("dilation", 1), params.get("ceil_mode", False),
                                params.get("return_indices", False))
        _new_op(FloatOp("max_pool", node.name, [value(args[0])], node.name, attrs=attrs), node, ops, value_of,
                producer)
    elif target is F.dropout:
        value_of[node.name] = value(args[0])
    else:
        label = getattr(target, "__name__", str(target))
        raise _unsupported(f"operation {label} at {node.name}")


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _max_pool_attrs(name, kernel, stride, padding, dilation, ceil_mode, return_indices) -> dict:
    """kernel/stride/padding of a plain 2-d max pooling; the rarer options are an error naming the layer."""
    stride = kernel if stride is None or stride == [] or stride == () else stride
    if _pair(dilation) != [1, 1] or ceil_mode or return_indices:
        raise _unsupported(f"max pooling {name} with dilation, ceil_mode or return_indices")
    return {"kernel": _pair(kernel), "stride": _pair(stride), "padding": _pair(padding)}
