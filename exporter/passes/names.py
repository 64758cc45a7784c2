"""Every tensor and node name the quantization passes add to a graph, derived in one place.

Names are built from the tensor or layer they belong to, so a pass is idempotent in what it names, two
passes never collide, and the TensorRT checker and the manifest can find a layer's parts by name.
"""
from __future__ import annotations


def _safe(name: str) -> str:
    return name.replace("/", "_").replace(":", "_")


# smoothing (per activation tensor)
def smooth_inv(tensor: str) -> str:
    return f"{_safe(tensor)}__smooth_inv"


def smoothed(tensor: str) -> str:
    return f"{_safe(tensor)}__smoothed"


def smooth_mul(tensor: str) -> str:
    return f"{_safe(tensor)}__smooth_mul"


def private(name: str, owner: str) -> str:
    """A private copy of a deduplicated constant for one node or layer."""
    return f"{_safe(name)}__{_safe(owner)}"


# weights (per layer)
def weight_q(layer: str) -> str:
    return f"{layer}.weight_quantized"


def weight_scale(layer: str) -> str:
    return f"{layer}.weight_scale"


def weight_dq(layer: str) -> str:
    return f"{layer}.weight_dequantized"


def lowrank(layer: str, part: str) -> str:
    """`part` is one of L1, L2 (constants), in16, h16, out16, out (tensors)."""
    return f"{layer}.lowrank.{part}"


def matmul_out(layer: str, part: str) -> str:
    return f"{layer}.matmul.{part}"


# activations (per activation tensor, shared by the Linears that read it)
def act(tensor: str, part: str) -> str:
    """`part`: scale, zero_point, q, dq, prescale_table, prescale, prescaled, ..."""
    return f"{_safe(tensor)}.act.{part}"


# the bucket index computed from t inside the graph
BUCKET_EDGES = "quadit.bucket.interior_edges"
BUCKET = "quadit.bucket.index"


def bucket(part: str) -> str:
    return f"quadit.bucket.{part}"


def node(tensor_or_layer: str, op: str) -> str:
    return f"{_safe(tensor_or_layer)}.{op}"
