"""Where Q/DQ pairs go: the per-op placement table and the plan computed from it.

The table follows what onnxruntime's QDQ fusion (its selector/action transformer) accepts:

* A quantized op reads *every* float input through a DequantizeLinear (weights as int8, biases
  as int32 with scale ``s_x * s_w``) and its output goes *only* to a QuantizeLinear, never to a
  graph output; then ``DQ -> op -> Q`` becomes one integer kernel (QLinearConv, QGemm,
  QLinearMatMul, QLinearAdd, QLinearConcat, QLinearAveragePool, ...).
* A Relu or Clip that is the only reader of such an output is *absorbed*: no pair between the
  op and the activation, and the Q after the activation uses the post-activation range with
  zero point ``qmin``, which is the condition for onnxruntime to drop the activation.
* Data-movement ops (MaxPool, Reshape, Flatten, Resize, Transpose, Split, ...) keep their
  input's scale and zero point on their outputs (every output of a Split); onnxruntime then
  runs them on the integers. A Split whose outputs had scales of their own would run in
  float between a DequantizeLinear and one QuantizeLinear per output.
* Concat inputs produced by a quantized op and read by nothing else take the Concat's output
  parameters, so QLinearConcat copies bytes instead of requantizing (not a Split's outputs,
  whose parameters are those of the Split's input and of its other outputs).
* Elementwise ops (Add, Mul, Concat, Sigmoid, Softmax, pools) are quantized only inside a
  chain of integer kernels, and never where they raise one tensor to a power (:mod:`.chains`).
* Gemm and MatMul quantize their output only when a reader wants a quantized input; otherwise
  QGemm / MatMulIntegerToFloat return float directly (e.g. the logits).
* One QuantizeLinear per tensor; one DequantizeLinear per reading node.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxopt.ir import attr, const_array, is_constant, is_standard, node_label
from onnxopt.layouts import gemm_bias, weight_layout
from onnxopt.pass_base import PassResult
from onnxopt.passes.quantize.chains import unchained
from onnxopt.passes.quantize.refusion import refused_readers

QUANTIZE = "quantize"
"""Output gets its own Q (from its calibrated range)."""
SAME = "same"
"""Output shares the parameters of input 0 (data movement)."""
OPTIONAL = "optional"
"""Output is quantized only if a reader wants it quantized; else the kernel returns float."""


def _no_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    return None


def _ok(node: ir.Node) -> str | None:
    return None


def _channel_axis(node: ir.Node, weight: np.ndarray) -> int | None:
    layout = weight_layout(node, weight.ndim)
    return None if layout is None else layout.per_channel_axis()


def _gemm_check(node: ir.Node) -> str | None:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = const_array(node.inputs[2])
        b = const_array(node.inputs[1])
        if bias is None or b is None or b.ndim != 2:
            return None  # reported by the constant checks
        found = gemm_bias(node, bias, weight_layout(node, 2).out_channels(b.shape))
        return found if isinstance(found, str) else None
    return None


def _no_dilations(node: ir.Node) -> str | None:
    dilations = attr(node, "dilations")
    if dilations is not None and any(d != 1 for d in dilations):
        return "onnxruntime's QLinearAveragePool has no dilations"
    return None


def _single_output(node: ir.Node) -> str | None:
    extra = [v for v in node.outputs[1:] if v is not None and (v.uses() or v.is_graph_output())]
    return "its second output is used" if extra else None


@dataclass(frozen=True)
class OpRule:
    """How one op type is quantized.

    Attributes:
        activations: Input indices read as quantized activations (None = every input).
        output: ``QUANTIZE``, ``SAME`` or ``OPTIONAL`` (see the module constants).
        weight: Input index of a constant weight quantized int8 symmetric.
        weight_axis: Output-channel axis of the weight for per-channel scales (None = per
            tensor only).
        bias: Input index of a bias quantized to int32.
        weight_or_activation: The weight input may instead be a second activation
            (MatMul of two computed tensors).
        kernel: What onnxruntime turns the group into, for the report.
        min_opset: Lowest opset at which onnxruntime has the integer kernel.
        check: Extra op-specific check returning a refusal reason or None.
    """

    activations: tuple[int, ...] | None
    output: str = QUANTIZE
    weight: int | None = None
    weight_axis: Callable[[ir.Node, np.ndarray], int | None] = _no_axis
    bias: int | None = None
    weight_or_activation: bool = False
    kernel: str = ""
    min_opset: int = 10
    check: Callable[[ir.Node], str | None] = _ok


#: Op type -> how it is quantized.
PLACEMENT: dict[str, OpRule] = {
    "Conv": OpRule((0,), weight=1, weight_axis=_channel_axis, bias=2, kernel="QLinearConv"),
    "ConvTranspose": OpRule((0,), weight=1, weight_axis=_channel_axis, bias=2,
                            kernel="ConvTranspose on dequantized int8"),
    "Gemm": OpRule((0,), OPTIONAL, weight=1, weight_axis=_channel_axis, bias=2, kernel="QGemm",
                   check=_gemm_check),
    "MatMul": OpRule((0,), OPTIONAL, weight=1, weight_axis=_channel_axis,
                     weight_or_activation=True,
                     kernel="QLinearMatMul / MatMulIntegerToFloat"),
    "Add": OpRule((0, 1), kernel="QLinearAdd"),
    "Mul": OpRule((0, 1), kernel="QLinearMul"),
    "Concat": OpRule(None, kernel="QLinearConcat"),
    "AveragePool": OpRule((0,), kernel="QLinearAveragePool", check=_no_dilations),
    "GlobalAveragePool": OpRule((0,), kernel="QLinearGlobalAveragePool"),
    "Sigmoid": OpRule((0,), kernel="QLinearSigmoid"),
    "Softmax": OpRule((0,), kernel="QLinearSoftmax", min_opset=13),
    "LeakyRelu": OpRule((0,), kernel="QLinearLeakyRelu"),
    "MaxPool": OpRule((0,), SAME, kernel="MaxPool on int8", min_opset=12,
                      check=_single_output),
    "Resize": OpRule((0,), SAME, kernel="Resize on int8", min_opset=11),
    "Flatten": OpRule((0,), SAME, kernel="Flatten on int8"),
    "Reshape": OpRule((0,), SAME, kernel="Reshape on int8", min_opset=5),
    "Transpose": OpRule((0,), SAME, kernel="Transpose on int8"),
    "Squeeze": OpRule((0,), SAME, kernel="Squeeze on int8"),
    "Unsqueeze": OpRule((0,), SAME, kernel="Unsqueeze on int8"),
    "Split": OpRule((0,), SAME, kernel="Split on int8"),
}


def _clip_absorbable(node: ir.Node) -> bool:
    return all(v is None or is_constant(v) for v in node.inputs[1:3])


#: Activations that disappear into the preceding integer kernel when they are its only reader.
ABSORBED_ACTIVATIONS: dict[str, Callable[[ir.Node], bool]] = {
    "Relu": lambda node: True,
    "Clip": _clip_absorbable,
}

#: Ops counted as "compute" for fusion checks and the sensitivity ranking.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


@dataclass
class NodePlan:
    """One node to quantize.

    Attributes:
        node: The node.
        index: Its position in graph order (stable across clones of the model).
        rule: Its placement rule.
        activations: Indices of inputs read through a DequantizeLinear as activations.
        weight: Index of the int8 weight input, or None.
        bias: Index of the int32 bias input, or None (absent bias).
        output: The tensor that gets the QuantizeLinear (after an absorbed activation), or
            None when the output stays float.
        absorbed: The absorbed Relu/Clip, if any.
        more_outputs: The other outputs of a data-movement op with several (Split), which
            share ``output``'s parameters.
    """

    node: ir.Node
    index: int
    rule: OpRule
    activations: list[int]
    weight: int | None = None
    bias: int | None = None
    output: ir.Value | None = None
    absorbed: ir.Node | None = None
    more_outputs: list[ir.Value] = field(default_factory=list)

    def quantized_outputs(self) -> list[ir.Value]:
        """Every output that gets a QuantizeLinear."""
        return [] if self.output is None else [self.output, *self.more_outputs]


@dataclass
class Plan:
    """Every node, tensor and parameter group to quantize.

    Attributes:
        nodes: Nodes to quantize, in graph order.
        tensors: Computed activation tensors that get a QuantizeLinear, by name.
        parent: Union-find forest over tensor names; tensors of one group share parameters.
    """

    nodes: list[NodePlan] = field(default_factory=list)
    tensors: dict[str, ir.Value] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)

    def group(self, name: str) -> str:
        """The representative tensor name of ``name``'s parameter group."""
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(name, name) != root:  # path compression
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        """Make ``a`` and ``b`` share parameters."""
        ra, rb = self.group(a), self.group(b)
        if ra != rb:
            self.parent[ra] = rb

    def groups(self) -> dict[str, list[str]]:
        """Group representative -> member tensor names."""
        members: dict[str, list[str]] = {}
        for name in self.tensors:
            members.setdefault(self.group(name), []).append(name)
        return members


def _float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype == ir.DataType.FLOAT


def _check_node(node: ir.Node, rule: OpRule, opset: int) -> NodePlan | str | None:
    """A draft plan for ``node``, a refusal reason, or None when there is nothing to quantize."""
    if opset < rule.min_opset:
        return f"onnxruntime has no integer {node.op_type} below opset {rule.min_opset}"
    reason = rule.check(node)
    if reason:
        return reason
    indices = list(range(len(node.inputs))) if rule.activations is None else [
        i for i in rule.activations if i < len(node.inputs)]
    weight = None
    if rule.weight is not None and rule.weight < len(node.inputs):
        w = node.inputs[rule.weight]
        if is_constant(w) and not _float(w):
            return "weight is not float32"
        if is_constant(w):
            weight = rule.weight
        elif rule.weight_or_activation:
            indices.append(rule.weight)
        else:
            return "weight is not a constant (or is a graph input)"
    bias = None
    if rule.bias is not None and rule.bias < len(node.inputs) and node.inputs[rule.bias]:
        if not is_constant(node.inputs[rule.bias]):
            return "bias is not a constant (or is a graph input)"
        if not _float(node.inputs[rule.bias]):
            return "bias is not float32"
        bias = rule.bias
    values = [node.inputs[i] for i in indices]
    if any(v is None for v in values) or not values:
        return "an activation input is missing"
    if not all(_float(v) for v in values) or not _float(node.outputs[0]):
        if all(v.dtype is not None and v.dtype != ir.DataType.FLOAT for v in values):
            return None  # integer data (shapes, indices): nothing to quantize
        return "input or output is not float32 (or its type is unknown)"
    if any(not v.name for v in values) or not node.outputs[0].name:
        return "a tensor has no name"
    if all(is_constant(v) for v in values):
        return None  # constant subgraph: folding, not quantization, is the fix
    if rule.output == SAME and is_constant(values[0]):
        return None
    return NodePlan(node, -1, rule, indices, weight, bias)


def _absorbed_activation(value: ir.Value, excluded: Callable[[ir.Node], bool]) -> ir.Node | None:
    """The Relu/Clip that is the only reader of ``value`` and can be fused, if any."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    reader, index = uses[0].node, uses[0].idx
    check = ABSORBED_ACTIVATIONS.get(reader.op_type)
    if check is None or not is_standard(reader) or index != 0 or excluded(reader):
        return None
    if not _float(reader.outputs[0]) or not check(reader):
        return None
    return reader


def plan_quantization(
    graph: ir.Graph,
    opset: int,
    result: PassResult,
    *,
    exclude_nodes: Collection[str] = (),
    exclude_ops: Collection[str] = (),
    keep_float: Collection[int] = (),
) -> Plan:
    """Decide what to quantize in ``graph``; refusals are recorded on ``result``.

    A node that stays float (excluded, kept float, or an op this table does not quantize)
    is never left where onnxruntime would fuse it into an integer kernel anyway: the
    quantized readers of its output stay float too (:mod:`.refusion`).

    Args:
        graph: The float graph.
        opset: Its default-domain opset.
        result: Collects refusals ("excluded", "weight is not a constant", ...).
        exclude_nodes: Node names that stay float.
        exclude_ops: Op types that stay float.
        keep_float: Graph-order indices of nodes that stay float (the accuracy fallback).
    """
    forced: dict[int, str] = {}
    while True:
        plan = _plan(graph, opset, PassResult(False), set(exclude_nodes), set(exclude_ops),
                     set(keep_float), forced)
        more = {i: why for i, why in refused_readers(graph, plan).items() if i not in forced}
        if not more:
            break
        forced.update(more)
    return _plan(graph, opset, result, set(exclude_nodes), set(exclude_ops), set(keep_float),
                 forced)


def _plan(graph: ir.Graph, opset: int, result: PassResult, exclude_nodes: set[str],
          exclude_ops: set[str], keep_float: set[int], forced: dict[int, str]) -> Plan:
    """One planning round with the nodes of ``forced`` kept float for the reason given."""

    def excluded(node: ir.Node) -> bool:
        return node.name in exclude_nodes or node.op_type in exclude_ops

    plan = Plan()
    for index, node in enumerate(graph):
        rule = PLACEMENT.get(node.op_type)
        if rule is None or not is_standard(node):
            continue
        if excluded(node):
            result.refuse(node_label(node), "excluded by option (stays float)")
            continue
        if index in keep_float:
            result.refuse(node_label(node), "kept float by the accuracy fallback")
            continue
        if index in forced:
            result.refuse(node_label(node), f"stays float: {forced[index]}")
            continue
        draft = _check_node(node, rule, opset)
        if isinstance(draft, str):
            result.refuse(node_label(node), f"stays float: {draft}")
        elif draft is not None:
            draft.index = index
            plan.nodes.append(draft)
    dropped = unchained(graph, plan.nodes,
                        lambda p: p.rule.output == QUANTIZE and p.node.op_type not in COMPUTE_OPS,
                        lambda p: p.rule.output == SAME)
    for np_ in plan.nodes:
        if id(np_.node) in dropped:
            result.refuse(node_label(np_.node), f"stays float: {dropped[id(np_.node)]}")
    plan.nodes = [np_ for np_ in plan.nodes if id(np_.node) not in dropped]

    for np_ in plan.nodes:
        for i in np_.activations:
            value = np_.node.inputs[i]
            if value is not None and not is_constant(value):
                plan.tensors[value.name] = value
    produced: set[str] = set()
    for np_ in plan.nodes:
        out = np_.node.outputs[0]
        if np_.rule.output == SAME:
            # every float output that is read (a Split has several); MaxPool's indices
            # output is int64 and refused by its check when used
            outs = [v for v in np_.node.outputs if v is not None and _float(v)
                    and (v.uses() or v.is_graph_output())] or [out]
            for value in outs:
                plan.tensors[value.name] = value
                plan.union(value.name, np_.node.inputs[np_.activations[0]].name)
            if len(outs) == 1:
                # not a Split's outputs: one joining a Concat's group would drag the Split's
                # input and every other output into it (a C2f block's Concat also holds
                # the bottleneck's output); QLinearConcat requantizes that input instead
                produced.add(outs[0].name)
            np_.output, np_.more_outputs = outs[0], outs[1:]
            continue
        absorbed = _absorbed_activation(out, excluded)
        post = absorbed.outputs[0] if absorbed is not None else out
        if np_.rule.output == OPTIONAL and post.name not in plan.tensors:
            continue
        np_.output, np_.absorbed = post, absorbed
        plan.tensors[post.name] = post
        produced.add(post.name)
    for np_ in plan.nodes:
        if np_.node.op_type != "Concat" or np_.output is None:
            continue
        for value in np_.node.inputs:
            if (value is not None and value.name in produced and len(value.uses()) == 1
                    and not value.is_graph_output()):
                plan.union(value.name, np_.output.name)
    return plan
