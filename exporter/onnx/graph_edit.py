"""Small ONNX graph utilities the passes share: lookups, topological order, pruning, sizes, saving."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

# bits per element of the initializer types the passes write
_SUB_BYTE = {TensorProto.INT4: 4, TensorProto.UINT4: 4}


def node_by_name(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if node.name == name:
            return node
    raise KeyError(f"no node named {name}")


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it (graph inputs and initializers have none)."""
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            out[name].append(node)
    return out


def initializer_bytes(tensor: onnx.TensorProto) -> int:
    """Storage bytes of one initializer; INT4 packs two values per byte."""
    count = int(np.prod(tensor.dims, dtype=np.int64))
    bits = _SUB_BYTE.get(tensor.data_type)
    if bits:
        return (count * bits + 7) // 8
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def weight_bytes(model: onnx.ModelProto) -> int:
    return sum(initializer_bytes(t) for t in model.graph.initializer)


def toposort(model: onnx.ModelProto) -> None:
    """Reorder nodes topologically (passes append nodes wherever convenient); stable otherwise."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    waiting: dict[str, list[int]] = defaultdict(list)
    missing = []
    for index, node in enumerate(pending):
        need = {i for i in node.input if i not in available}
        missing.append(need)
        for name in need:
            waiting[name].append(index)
    ready = [i for i, need in enumerate(missing) if not need]
    done = [False] * len(pending)
    import heapq

    heapq.heapify(ready)
    while ready:
        index = heapq.heappop(ready)
        if done[index]:
            continue
        done[index] = True
        ordered.append(pending[index])
        for out in pending[index].output:
            for other in waiting.pop(out, []):
                missing[other].discard(out)
                if not missing[other]:
                    heapq.heappush(ready, other)
    if len(ordered) != len(pending):
        stuck = next(pending[i] for i, d in enumerate(done) if not d)
        dangling = sorted(missing[pending.index(stuck)])[:3]
        raise ValueError(f"graph has a cycle or a dangling input at node {stuck.name} ({dangling})")
    del graph.node[:]
    graph.node.extend(ordered)


def prune_initializers(model: onnx.ModelProto) -> int:
    """Drop initializers no node reads (the FP32 weights a pass replaced); returns the count."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    dropped = len(model.graph.initializer) - len(keep)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return dropped


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def drop_stale_value_info(model: onnx.ModelProto) -> int:
    """Keep `value_info` only for tensors a node of the graph produces; returns the count dropped.

    The dynamo exporter also lists initializers there. A tool that rewrites an initializer (ONNX
    Runtime's quantizer re-lays a Gemm weight, then runs strict shape inference) contradicts such an
    entry and fails; entries for tensors a pass removed are stale the same way."""
    graph = model.graph
    produced = {name for node in graph.node for name in node.output}
    fixed = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o.name for o in graph.output}
    keep = [vi for vi in graph.value_info if vi.name in produced and vi.name not in fixed]
    dropped = len(graph.value_info) - len(keep)
    if dropped:
        del graph.value_info[:]
        graph.value_info.extend(keep)
    return dropped


def save(model: onnx.ModelProto, path: Path, limit: int) -> list[str]:
    """Save `model` (without stale value_info); weights go to `<name>.data` beside it when they pass
    `limit` bytes (protobuf's 2 GB ceiling). Returns the files written."""
    path = Path(path)
    drop_stale_value_info(model)
    external = weight_bytes(model) > limit
    onnx.save(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return [path.name] + ([path.name + ".data"] if external else [])
