"""Weights used only inside an If branch, moved into that branch.

torch's exporter keeps every parameter as an initializer of the main graph, including those
only the branches of an If node (`torch.cond`) read. ONNX allows a branch to read outer-scope
values, but ONNX Runtime's fusion of `DequantizeLinear` into `MatMulNBits` looks for the weight
and its scales among the branch's own initializers and refuses to load the graph otherwise
("TransposeDQWeightsForMatMulNBits Missing required scale"). So each initializer that the nodes
of exactly one branch read (and nothing else: no node of another graph, no graph output) is
moved into that branch. Only the `TensorProto`s move: their bytes stay where they are (an
external data file's offsets are unchanged), and what the graph computes does not change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import onnx


def _branches(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The subgraphs held by `graph`'s nodes' attributes (If branches, Loop bodies), directly."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield attribute.g
            yield from attribute.graphs


def _reads(graph: onnx.GraphProto) -> set[str]:
    """Names a graph's nodes read, its nested subgraphs' included."""
    names = {name for node in graph.node for name in node.input if name}
    for branch in _branches(graph):
        names |= _reads(branch)
    return names


def localize_initializers(model: onnx.ModelProto) -> int:
    """Move each main-graph initializer that only one branch reads into that branch (in place);
    returns how many moved."""
    main = model.graph
    readers: dict[str, list[int]] = defaultdict(list)  # name → the branches reading it
    branches = list(_branches(main))
    for index, branch in enumerate(branches):
        for name in _reads(branch):
            readers[name].append(index)
    outside = {name for node in main.node for name in node.input}
    outside |= {output.name for output in main.output}
    kept, moved = [], 0
    for tensor in main.initializer:
        owners = readers.get(tensor.name, [])
        if len(owners) == 1 and tensor.name not in outside:
            branches[owners[0]].initializer.append(tensor)
            moved += 1
        else:
            kept.append(tensor)
    del main.initializer[:]
    main.initializer.extend(kept)
    return moved


def localize_file(path: Path) -> int:
    """`localize_initializers` on the ONNX file at `path`, rewritten in place (its external
    data files untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    moved = localize_initializers(model)
    if moved:
        onnx.save(model, str(path))
    return moved
