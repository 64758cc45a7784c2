"""TensorRT for the UNet family (AudioLDM / TANGO): optimisation profiles from the manifest, the build script
(checker first, Polygraphy, engines.json), the tensorrt backend's wiring, and the roofline PREDICTION of FP16 vs
w8a8 UNet engines. Without TensorRT everything but the `trt` tests runs: the build goes through
`build_engines`' own code with Polygraphy's builder faked, the backend through ONNX Runtime sessions standing in
for its engines. The `trt` + `gpu` tests are written against the documented TensorRT 10 / Polygraphy API and have
not run (no TensorRT here).

One audioldm-mini w8a8 TensorRT-target export and one `bench.py --predict` run, side by side as subprocesses with
one PyTorch thread each (see tests/test_unet_family.py for why)."""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FAKE_MACHINE, one_line_error, run_script
from onnx import numpy_helper

from engines.runtime.tensorrt import (
    ENGINES_JSON,
    BuildSettings,
    MachineFacts,
    build_plan,
    check_engine_metadata,
    check_graphs,
    graph_profiles,
    polygraphy_convert_command,
)
from engines.runtime.unet_tensorrt import UNET_ENGINE_GRAPHS, frame_range
from exporter.errors import InputError
from exporter.onnx.unet_graphs import unet_inputs

pytestmark = pytest.mark.filterwarnings("ignore")
HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
MACHINE = MachineFacts(*FAKE_MACHINE)
# the manifest dims of both mini presets (exporter.models.unet_audio.UNetAudioModel.dims; the export's manifest is
# checked against them below): 10 ms hop, VAE x4, 64 mel bins, UNet frames a multiple of 4, 5.12 s default, 20.48 max
MINI_DIMS = {"latent_channels": 8, "vae_scale": 4, "mel_bins": 64, "sample_rate": 16000, "hop_seconds": 0.01,
             "text_length": 64, "latent_frame_multiple": 4, "default_seconds": 5.12, "max_seconds": 20.48}
PRESET_DIMS = {"audioldm-mini": {**MINI_DIMS, "text_embed_dim": 64}, "tango-mini": {**MINI_DIMS, "text_hidden_dim": 64}}


def _manifest(preset: str) -> dict:
    family = preset.split("-")[0]
    return {"family": "unet", "unet_family": family, "dims": PRESET_DIMS[preset],
            "graphs": {"unet": {"inputs": list(unet_inputs(family))}}}


@pytest.fixture(scope="module")
def unet_trt(tmp_path_factory):
    """(export dir, manifest, predict.json) of audioldm-mini: a w8a8 --target tensorrt export (1 calibration
    prompt, no report) and `bench.py --predict` (default lengths: 128 and 512 latent frames)."""
    root = tmp_path_factory.mktemp("unet-trt")
    model = ["--model", "audioldm-mini", "--synthetic-weights"]
    jobs = {"export": ("export.py", *model, "--scheme", "w8a8", "--target", "tensorrt", "--calib-prompts", "1",
                       "--calib-steps", "3", "--report-prompts", "0", "--out", str(root / "export")),
            "predict": ("bench.py", "--predict", *model, "--out", str(root / "predict"))}
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(jobs, pool.map(lambda job: run_script(*job, env=ONE_THREAD), jobs.values())))
    for name, proc in procs.items():
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
    export = root / "export"
    return export, json.loads((export / "manifest.json").read_text()), \
        json.loads((root / "predict" / "predict.json").read_text())


# --- profiles: numbers, no export ---

def test_unet_profiles_of_the_mini_presets():
    """Default settings: frames from 1 s (25 latent frames, rounded up to 28 as the runtime rounds) to the model's
    20.48 s (512), tuned for its 5.12 s default (128); batch 1..2 tuned for the CFG batch of 2."""
    settings = BuildSettings()
    for preset in PRESET_DIMS:
        manifest = _manifest(preset)
        assert frame_range(manifest, settings) == (28, 128, 512)
        (unet,) = graph_profiles(manifest, "unet", settings)
        assert unet["sample"] == ((1, 8, 28, 16), (2, 8, 128, 16), (2, 8, 512, 16))
        assert unet["timestep"] == ((1,), (2,), (2,))
        if preset == "audioldm-mini":
            assert list(unet) == ["sample", "timestep", "class_labels"]
            assert unet["class_labels"] == ((1, 64), (2, 64), (2, 64))
        else:
            assert list(unet) == ["sample", "timestep", "encoder_hidden_states", "encoder_attention_mask"]
            assert unet["encoder_hidden_states"] == ((1, 64, 64), (2, 64, 64), (2, 64, 64))
            assert unet["encoder_attention_mask"] == ((1, 64), (2, 64), (2, 64))
        span = ((1, 64), (1, 64), (2, 64))
        assert graph_profiles(manifest, "text_encoder", settings) == [{"input_ids": span, "attention_mask": span}]
        assert graph_profiles(manifest, "vae_decoder", settings) == [
            {"latents": ((1, 8, 28, 16), (1, 8, 128, 16), (1, 8, 512, 16))}]
        assert graph_profiles(manifest, "vocoder", settings) == [{"mel": ((1, 112, 64), (1, 512, 64), (1, 2048, 64))}]


def test_unet_frame_range_follows_the_runtime_rounding():
    """Seconds not on a UNet block round up (0.5 s: 50 mel frames, 13 latent, 16); every length the runtime
    makes for seconds within [min, max] falls inside the profile; out-of-range seconds are refused."""
    from exporter.models.unet_sampling import latent_shape

    manifest = _manifest("audioldm-mini")
    settings = BuildSettings(min_seconds=0.5, opt_seconds=2.0, max_seconds=10.0)
    assert frame_range(manifest, settings) == (16, 52, 252)
    assert frame_range(manifest, BuildSettings(min_seconds=8.0)) == (200, 200, 512)  # opt: the default, clamped up
    assert graph_profiles(manifest, "vocoder", settings)[0]["mel"] == ((1, 64, 64), (1, 208, 64), (1, 1008, 64))
    lo, _, hi = frame_range(manifest, BuildSettings())
    for ms in range(1000, 20481, 7):
        frames = latent_shape(MINI_DIMS, ms / 1000)[1]
        assert lo <= frames <= hi and frames % 4 == 0, ms
    with pytest.raises(InputError, match="limit \\(20.48 s\\)"):
        frame_range(manifest, BuildSettings(max_seconds=30.0))
    with pytest.raises(InputError, match="shortest output, 0.040 s"):
        frame_range(manifest, BuildSettings(min_seconds=0.01))
    with pytest.raises(InputError, match="graph 'conditioners'"):
        graph_profiles(manifest, "conditioners", BuildSettings())


# --- the build: plan, checks, Polygraphy ---

def test_export_manifest_has_the_dims_the_profiles_read(unet_trt):
    export, manifest, _ = unet_trt
    assert manifest["family"] == "unet" and manifest["dims"] == PRESET_DIMS["audioldm-mini"]
    items = build_plan(export, manifest)
    assert [(i.name, i.onnx, i.engine) for i in items] == [(g, f"{g}.onnx", f"{g}.engine") for g in UNET_ENGINE_GRAPHS]
    check_graphs(export, items, manifest, BuildSettings())  # every graph passes the checker, the profiles fit


def _polygraphy_parse(command: str):
    from polygraphy.tools.args import TrtConfigArgs, TrtLoadNetworkArgs
    from polygraphy.tools.convert import Convert

    argv = shlex.split(command)
    tool = Convert()
    args = tool.setup_parser().parse_args(argv[2:])
    tool.parse(args)
    profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in tool.arg_groups[TrtConfigArgs].profile_dicts]
    return args, profiles, tool.arg_groups[TrtLoadNetworkArgs].strongly_typed


@pytest.mark.skipif(HAS_TRT_GPU, reason="this machine can build engines")
def test_unet_build_script_without_tensorrt_prints_commands_exits_2_and_writes_nothing(unet_trt, tmp_path):
    export, manifest, _ = unet_trt
    out = tmp_path / "engines"
    proc = run_script("build_engines.py", "--export", str(export), "--out", str(out), "--max-seconds", "10")
    assert proc.returncode == 2 and "TensorRT" in one_line_error(proc) and "Traceback" not in proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("polygraphy convert")]
    assert len(commands) == 4
    settings = BuildSettings(max_seconds=10.0)
    for graph, command in zip(UNET_ENGINE_GRAPHS, commands):
        args, profiles, strongly_typed = _polygraphy_parse(command)
        assert args.model_file == str(export / f"{graph}.onnx") and args.output == str(out / f"{graph}.engine")
        assert strongly_typed and profiles == graph_profiles(manifest, graph, settings)
    assert "sample:[2,8,252,16]" in commands[1] and "sample:[1,8,28,16]" in commands[1]  # 10 s max -> 252 frames
    assert not out.exists() and not list(tmp_path.glob(".engines*"))


def test_unet_build_engines_drives_polygraphy_and_writes_checkable_metadata(unet_trt, tmp_path, fake_trt):
    from engines.runtime.tensorrt import build_engines

    export, manifest, _ = unet_trt
    settings = BuildSettings(opt_level=2)
    doc = build_engines(export, tmp_path / "engines", settings)
    assert [Path(c.network.path).name for c in fake_trt.calls] == [f"{g}.onnx" for g in UNET_ENGINE_GRAPHS]
    for call, graph in zip(fake_trt.calls, UNET_ENGINE_GRAPHS):
        assert call.network.strongly_typed is True and not call.config.fp16 and not call.config.int8
        assert call.config.builder_optimization_level == 2 and call.config.tf32 is True
        profiles = [{n: (tuple(s.min), tuple(s.opt), tuple(s.max)) for n, s in p.items()} for p in call.config.profiles]
        assert profiles == graph_profiles(manifest, graph, settings) and len(profiles) == 1
    out = tmp_path / "engines"
    assert sorted(p.name for p in out.iterdir()) == sorted([ENGINES_JSON] + [f"{g}.engine" for g in UNET_ENGINE_GRAPHS])
    assert doc["family"] == "unet" and "conditioners" not in doc and "bucket_edges" not in doc
    assert doc["engines"]["unet"]["precision"] == "w8a8" and doc["engines"]["vocoder"]["precision"] == "fp32"
    assert doc["engines"]["unet"]["profiles"] == [{
        "sample": {"min": [1, 8, 28, 16], "opt": [2, 8, 128, 16], "max": [2, 8, 512, 16]},
        "timestep": {"min": [1], "opt": [2], "max": [2]},
        "class_labels": {"min": [1, 64], "opt": [2, 64], "max": [2, 64]}}]
    assert doc["engines"]["vocoder"]["profiles"] == [{"mel": {"min": [1, 112, 64], "opt": [1, 512, 64],
                                                              "max": [1, 2048, 64]}}]
    assert json.loads((out / ENGINES_JSON).read_text()) == doc
    assert check_engine_metadata(out / ENGINES_JSON, export, MACHINE) == doc


def test_a_unet_graph_breaking_a_tensorrt_rule_is_refused_before_any_build(unet_trt, tmp_path, fake_trt):
    """The checker runs on every graph first: an activation scale of 0 (the parser rejects it) fails the whole
    build in one line, nothing built; a profile that contradicts a graph's static dims too."""
    from engines.runtime.tensorrt import build_engines

    export, manifest, _ = unet_trt
    broken = tmp_path / "export"
    shutil.copytree(export, broken)
    model = onnx.load(str(broken / "unet.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits)
    scale = inits[q.input[1]]
    scale.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scale)), scale.name))
    onnx.save(model, str(broken / "unet.onnx"))
    with pytest.raises(InputError, match="unet.onnx breaks .* TensorRT rule.*positive scales") as info:
        build_engines(broken, tmp_path / "engines", BuildSettings())
    assert "\n" not in str(info.value) and fake_trt.calls == [] and not (tmp_path / "engines").exists()
    wrong = {**manifest, "dims": {**manifest["dims"], "latent_channels": 4}}
    with pytest.raises(InputError, match="vae_decoder.onnx: profile shape \\[1, 4, 28, 16\\] for 'latents'"):
        check_graphs(export, build_plan(export, wrong)[2:], wrong, BuildSettings())


def test_convert_command_of_a_unet_graph(unet_trt, tmp_path):
    export, manifest, _ = unet_trt
    command = polygraphy_convert_command(export, "unet.onnx", tmp_path / "unet.engine", BuildSettings(opt_seconds=1.0))
    args, profiles, strongly_typed = _polygraphy_parse(command)
    assert strongly_typed and profiles == [{"sample": ((1, 8, 28, 16), (2, 8, 28, 16), (2, 8, 512, 16)),
                                            "timestep": ((1,), (2,), (2,)),
                                            "class_labels": ((1, 64), (2, 64), (2, 64))}]


# --- the runtime backend ---

class _OrtEngine:
    """An engine stand-in: EngineRunner's call interface ({input: tensor} -> {output: tensor}) over an ONNX Runtime
    session of the export, checking every call's shapes against the profile the default build gives that graph."""

    def __init__(self, session, manifest: dict, graph: str) -> None:
        self.session, self.outputs = session, list(manifest["graphs"][graph]["outputs"])
        (self.profile,) = graph_profiles(manifest, graph, BuildSettings())
        self.shapes: list[dict] = []

    def __call__(self, feeds: dict) -> dict:
        shapes = {n: tuple(v.shape) for n, v in feeds.items()}
        assert set(shapes) == set(self.profile), shapes
        for n, (lo, _, hi) in self.profile.items():
            assert len(shapes[n]) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shapes[n], hi)), (n, shapes)
        self.shapes.append(shapes)
        out = self.session.run(self.outputs, {n: v.numpy() for n, v in feeds.items()})
        return {n: torch.from_numpy(v) for n, v in zip(self.outputs, out)}


def test_trt_unet_backend_feeds_its_engines_like_onnx_runtime(unet_trt):
    """`TrtUNetBackend`'s encode / unet / decode over stand-in engines (the ONNX Runtime backend's own sessions)
    give that backend's result exactly, and every shape it feeds lies inside the default build's profiles at 1 s
    (their minimum, 28 frames): the UNet at CFG batch 2, text, VAE and vocoder at batch 1."""
    from transformers import AutoTokenizer

    from engines.runtime.unet_pipeline import OrtUNetBackend, UNetGenerateOptions, UNetPipeline
    from engines.runtime.unet_tensorrt import TrtUNetBackend

    export, manifest, _ = unet_trt
    ort = OrtUNetBackend(export, manifest)
    backend = TrtUNetBackend.__new__(TrtUNetBackend)  # the engines replaced, the rest as built
    backend.runners = {g: _OrtEngine(ort.sessions[g], manifest, g) for g in UNET_ENGINE_GRAPHS}
    backend.inputs, backend.calls = list(manifest["conditioning"]["inputs"]), 0
    tokenizer = AutoTokenizer.from_pretrained(str(export / "tokenizer"), local_files_only=True)
    opts = UNetGenerateOptions(prompt="rain on a tin roof", seconds=1.0, steps=2, cfg_scale=2.5, seed=3)
    got = UNetPipeline(backend, manifest, tokenizer).generate(opts)
    want = UNetPipeline(ort, manifest, tokenizer).generate(opts)
    assert torch.equal(got.latents, want.latents) and torch.equal(got.audio, want.audio)
    assert got.audio.shape == (1, 1, 16000) and backend.calls == 2
    assert [s["sample"] for s in backend.runners["unet"].shapes] == [(2, 8, 28, 16)] * 2
    assert [s["input_ids"] for s in backend.runners["text_encoder"].shapes] == [(1, 64)] * 2
    assert backend.runners["vocoder"].shapes == [{"mel": (1, 112, 64)}]


def test_tensorrt_backend_for_a_unet_export_without_tensorrt_is_one_line(unet_trt, tmp_path):
    from engines.runtime.unet_pipeline import open_unet_pipeline

    export, manifest, _ = unet_trt
    with pytest.raises(InputError, match="--engines"):
        open_unet_pipeline(export, manifest, "tensorrt")
    with pytest.raises(InputError, match="--engines"):
        open_unet_pipeline(export, manifest, "onnxruntime", engines_dir=tmp_path)
    if not HAS_TRT_GPU:
        proc = run_script("generate.py", "--export", str(export), "--prompt", "x", "--seconds", "1", "--backend",
                          "tensorrt", "--engines", str(tmp_path), "--out", str(tmp_path / "a.wav"), env=ONE_THREAD)
        assert proc.returncode == 2 and proc.stderr.startswith("error: TensorRT") and "Traceback" not in proc.stderr
        assert not (tmp_path / "a.wav").exists()


# --- the speed PREDICTION (roofline; nothing is timed) ---

def test_checker_cli_reads_a_unet_graphs_precision_map(unet_trt, capsys):
    """`python -m exporter.tensorrt.checker unet.onnx --precision-map --latents N`: N is the UNet's latent frames
    (before, the UNet's `frames` dim had no value and the map failed)."""
    from exporter.tensorrt.checker import main

    export, _, _ = unet_trt
    assert main([str(export / "unet.onnx"), "--precision-map", "--latents", "128"]) == 0
    out = capsys.readouterr().out
    assert "unet.onnx: 12.6 GFLOP at 128 latents, batch 2: FP16 15.0%, FP32 0.1%, INT8 84.9%" in out
    assert "attention cores fusable 14/14" in out and "unet.onnx: ok (0 violations)" in out


def test_predicted_unet_speedup_fp16_vs_w8a8(unet_trt):
    """`bench.py --predict --model audioldm-mini`: FP16 vs w8a8 UNet per GPU at 128 and 512 latent frames. Measured
    here (predictions): w8a8 over FP16 1.13x (H100), 1.16x (H200), 1.11x (L40S), 1.25x (RTX 4090), 1.13x (B200)
    at 128 frames; 1.11x on H100 at 512. At this size the step is bound by memory traffic, most of it between the
    compute layers, which INT8 does not shrink. The export's own (calibrated) unet.onnx costs exactly as the flat
    graph the prediction builds: the per-bucket scale ops and types do not depend on calibrated values."""
    from exporter.tensorrt.precision_map import precision_map
    from exporter.tensorrt.speed_model import GPUS, predict

    export, _, doc = unet_trt
    assert doc["kind"].startswith("PREDICTION") and doc["family"] == "unet" and set(doc["lengths"]) == {"128", "512"}
    assert doc["lengths"]["128"]["seconds"] == pytest.approx(5.12)
    expected = {"128": {"H100": 1.13, "H200": 1.16, "L40S": 1.11, "RTX 4090": 1.25, "B200": 1.13}, "512": {"H100": 1.11}}
    for length, gpus in expected.items():
        table = doc["lengths"][length]["gpus"]
        assert set(table) == set(GPUS)
        for gpu, speedup in gpus.items():
            assert table[gpu]["fp16"]["speedup_vs_fp16"] == 1.0
            assert table[gpu]["w8a8"]["speedup_vs_fp16"] == pytest.approx(speedup, abs=0.03), (length, gpu)
    w8a8 = doc["lengths"]["128"]["precision"]["w8a8"]
    assert w8a8["layers"]["Conv"] == {"INT8 (FP16 out)": 47, "FP16": 2}  # conv_in / conv_out stay FP16
    assert w8a8["layers"]["weight GEMM"]["INT8 (FP16 out)"] == 70 and w8a8["violations"] == []
    assert w8a8["flop_share"]["INT8"] == pytest.approx(0.849, abs=0.01)
    assert doc["lengths"]["128"]["precision"]["fp16"]["gflops"] == pytest.approx(w8a8["gflops"])

    pmap = precision_map(onnx.load(str(export / "unet.onnx"), load_external_data=False), latents=128,
                         extra_dims={"frames": 128})
    h100 = predict(pmap, GPUS["H100"])
    assert h100["total_ms"] == pytest.approx(doc["lengths"]["128"]["gpus"]["H100"]["w8a8"]["total_ms"], rel=1e-9)
    # Conv layers by hand: INT8 ones at the INT8 peak reading an INT8 input, FP16 ones at the FP16 peak
    from exporter.tensorrt.speed_model import COMPUTE_EFFICIENCY, MEMORY_EFFICIENCY

    gpu = GPUS["H100"]
    convs = [x for x in pmap.layers if x.kind == "Conv"]
    hand = sum(max(x.flops / ((gpu.int8_tops if x.quantized else gpu.fp16_tflops) * 1e12 * COMPUTE_EFFICIENCY),
                   x.bytes / (gpu.bandwidth_tbs * 1e12 * MEMORY_EFFICIENCY)) for x in convs)
    norms = sum(max(x.flops / (gpu.tf32_tflops * 1e12 * COMPUTE_EFFICIENCY),
                    x.bytes / (gpu.bandwidth_tbs * 1e12 * MEMORY_EFFICIENCY)) for x in pmap.layers if x.kind == "LayerNorm")
    assert h100["norms_convs"] == pytest.approx(1e3 * (hand + norms), rel=1e-9)
    first = next(x for x in convs if x.quantized)  # [2, 64, 128, 16] INT8 in, FP16 out, 64x64x3x3 INT8 weights
    assert first.bytes == 2 * 64 * 128 * 16 * (1 + 2) + 64 * 64 * 9 and first.weight_bytes == 64 * 64 * 9
    assert first.flops == 2 * (2 * 64 * 128 * 16) * 64 * 9


# --- TensorRT + GPU: written against the documented API (TensorRT 10, Polygraphy); not run here ---

TRT_SETTINGS = BuildSettings(min_seconds=0.5, opt_seconds=1.0, max_seconds=2.0, opt_level=1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.float().abs().max())


@pytest.mark.trt
@pytest.mark.gpu
def test_unet_engines_track_onnx_runtime(unet_trt, tmp_path):
    """Real engines of the w8a8 export (INT8 Conv/GEMM in TensorRT vs their Q/DQ emulation in ONNX Runtime):
    each graph at the profile's ends, CFG batch 2 and batch 1, then a whole generation."""
    from engines.runtime.tensorrt import build_engines
    from engines.runtime.unet_pipeline import OrtUNetBackend, UNetGenerateOptions, open_unet_pipeline

    export, manifest, _ = unet_trt
    doc = build_engines(export, tmp_path / "engines", TRT_SETTINGS)
    assert set(doc["engines"]) == set(UNET_ENGINE_GRAPHS) and doc["family"] == "unet"
    trt = open_unet_pipeline(export, manifest, "tensorrt", engines_dir=tmp_path / "engines")
    ort = OrtUNetBackend(export, manifest)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (1, 64), generator=g)
    mask = torch.ones(1, 64, dtype=torch.int64)
    cond_t, cond_o = trt.backend.encode(ids, mask), ort.encode(ids, mask)
    assert _rel(cond_t["class_labels"], cond_o["class_labels"]) < 1e-2
    for frames in (16, 52):  # 0.5 s and 2 s
        for batch in (2, 1):
            x, t = torch.randn(batch, 8, frames, 16, generator=g), torch.full((batch,), 501.0)
            cond = {"class_labels": cond_o["class_labels"].repeat(batch, 1)}
            assert _rel(trt.backend.unet(x, t, cond), ort.unet(x, t, cond)) < 3e-2, (frames, batch)
        latents = torch.randn(1, 8, frames, 16, generator=g)
        assert _rel(trt.backend.decode(latents), ort.decode(latents)) < 1e-2
    with pytest.raises(InputError, match="profiles"):
        trt.backend.unet(torch.randn(2, 8, 56, 16), torch.full((2,), 1.0), {"class_labels": cond_o["class_labels"].repeat(2, 1)})
    opts = UNetGenerateOptions(prompt="rain on a tin roof", seconds=1.0, steps=10, cfg_scale=2.5, seed=3)
    got, want = trt.generate(opts), open_unet_pipeline(export, manifest, "onnxruntime").generate(opts)
    assert got.audio.shape == want.audio.shape == (1, 1, 16000) and torch.isfinite(got.audio).all()
    assert _rel(got.latents, want.latents) < 5e-2
