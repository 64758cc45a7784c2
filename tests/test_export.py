"""ONNX export: graph interface, opset/IR, dynamic axes, parity figures, FP16 islands, atomic output."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from exporter.errors import InputError
from exporter.onnx.artifacts import atomic_dir, read_manifest
from exporter.onnx.torch_export import IR_VERSION, OPSET, ort_session


def _io(model: onnx.ModelProto):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return ({i.name: dims(i) for i in model.graph.input}, {o.name: dims(o) for o in model.graph.output})


def test_export_writes_graphs_and_manifest(mini_export):
    out, manifest = mini_export
    for name in ("dit", "text_encoder", "conditioners", "vae_decoder"):
        assert (out / f"{name}.onnx").is_file()
    assert (out / "tokenizer").is_dir()
    on_disk = read_manifest(out)
    assert on_disk["parity"]["max_rel_error"] <= 1e-4
    assert on_disk["model"]["weights"] == "synthetic:0" and on_disk["model"]["synthetic"] is True
    assert on_disk["dims"]["cond_tokens"] == 64 + 2 and on_disk["dims"]["global_dim"] == 512
    assert {c["shape"][2] for c in on_disk["graphs"]["dit"]["parity"]["cases"]} == {32, 77}
    for graph in on_disk["graphs"].values():
        assert graph["parity"]["max_rel_error"] <= 1e-4
        assert graph["opset"] >= 21


def test_dit_graph_interface(mini_export):
    out, _ = mini_export
    model = onnx.load(str(out / "dit.onnx"), load_external_data=False)
    assert model.ir_version <= IR_VERSION
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    inputs, outputs = _io(model)
    assert list(inputs) == ["x", "t", "cross_attn_cond", "global_embed"] and list(outputs) == ["v"]
    assert isinstance(inputs["x"][0], str) and isinstance(inputs["x"][2], str)  # batch, length dynamic
    assert inputs["x"][1] == 64 and inputs["cross_attn_cond"][1:] == [66, 256] and inputs["global_embed"][1] == 512
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in model.graph.input)


def test_dit_runs_at_other_batch_and_length(mini, mini_export):
    from exporter.onnx.graphs import DiTGraph

    out, _ = mini_export
    session = ort_session(out / "dit.onnx")
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(1, 64, 203, generator=g), torch.rand(1, generator=g)
    c, ge = torch.randn(1, 66, 256, generator=g), torch.randn(1, 512, generator=g)
    got = session.run(None, {"x": x.numpy(), "t": t.numpy(), "cross_attn_cond": c.numpy(), "global_embed": ge.numpy()})[0]
    with torch.no_grad():
        ref = DiTGraph(mini.dit)(x, t, c, ge).numpy()
    assert got.shape == (1, 64, 203)
    assert np.abs(got - ref).max() / np.abs(ref).max() <= 1e-4


def test_vae_and_text_graph_shapes(mini_export):
    out, _ = mini_export
    vae = ort_session(out / "vae_decoder.onnx")
    audio = vae.run(None, {"latents": np.random.default_rng(0).standard_normal((2, 64, 3)).astype(np.float32)})[0]
    assert audio.shape == (2, 2, 3 * 2048)
    text = onnx.load(str(out / "text_encoder.onnx"))
    inputs, outputs = _io(text)
    assert list(inputs) == ["input_ids", "attention_mask"] and list(outputs) == ["last_hidden_state"]


def test_fp16_export_keeps_fp32_islands(mini, tmp_path):
    from exporter.stages.export import ExportOptions, export_model

    manifest = export_model(mini, tmp_path / "fp16", ExportOptions(scheme="fp16"))
    dit = manifest["graphs"]["dit"]
    assert dit["precision"] == "fp16"
    from exporter.onnx.torch_export import weight_bytes

    assert dit["weight_bytes"] < 0.55 * weight_bytes(mini.dit)  # about half of FP32
    # The FP16 graph's error against the FP32 model is FP16's own error, not the exporter's: it is
    # no worse than PyTorch running the same FP16 model with the same FP32 islands.
    from exporter.onnx.fp16 import fp16_dit
    from exporter.onnx.graphs import DiTGraph

    g = torch.Generator().manual_seed(3)
    case = (torch.randn(2, 64, 40, generator=g), torch.rand(2, generator=g), torch.randn(2, 66, 256, generator=g),
            torch.randn(2, 512, generator=g))
    with torch.no_grad():
        ref = DiTGraph(mini.dit)(*case)
        torch16 = DiTGraph(fp16_dit(mini.dit))(*case)
    session = ort_session(tmp_path / "fp16" / "dit.onnx")
    ort16 = torch.from_numpy(session.run(None, dict(zip(("x", "t", "cross_attn_cond", "global_embed"),
                                                        (c.numpy() for c in case))))[0])
    scale = ref.abs().max()
    torch_err, ort_err = float((torch16 - ref).abs().max() / scale), float((ort16 - ref).abs().max() / scale)
    assert ort_err <= 2 * torch_err + 1e-3, (ort_err, torch_err)
    assert manifest["parity"]["max_rel_error"] < 5e-2
    model = onnx.load(str(tmp_path / "fp16" / "dit.onnx"))
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert norms, "expected LayerNormalization nodes"
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.value_info) + list(model.graph.input)}
    f32 = onnx.TensorProto.FLOAT
    assert all(types.get(n.input[0], f32) == f32 for n in norms), "LayerNorm must compute in FP32"
    half = sum(1 for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16)
    assert half >= 6 * 7  # every block Linear weight is FP16


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "partial.onnx").write_bytes(b"x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_manifest_schema_mismatch_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(InputError, match="schema version"):
        read_manifest(tmp_path)
