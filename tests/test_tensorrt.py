"""TensorRT path: build planning, the equivalent polygraphy command, engine metadata checks and the DiT's
CFG/bucket logic run here without TensorRT; the tests marked `trt` + `gpu` build sao-mini engines and compare
them with ONNX Runtime (written against the documented TensorRT 10 / Polygraphy API)."""
from __future__ import annotations

import importlib.util
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch
from conftest import FAKE_MACHINE, one_line_error, run_script

from engines.runtime.tensorrt import (
    ENGINES_JSON,
    BuildSettings,
    MachineFacts,
    TrtDiT,
    build_plan,
    check_engine_metadata,
    check_parsable,
    graph_profiles,
    latent_lengths,
    polygraphy_convert_command,
)
from exporter.errors import InputError

HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()
MACHINE = MachineFacts(*FAKE_MACHINE)
DIMS = {"io_channels": 64, "cond_dim": 256, "cond_tokens": 66, "global_dim": 512, "sample_rate": 44100,
        "downsampling_ratio": 2048}


def _manifest(sample_size: int = 524288, buckets: int = 0) -> dict:
    dit = {"file": "dit.onnx", "files": ["dit.onnx"], "inputs": ["x", "t", "cross_attn_cond", "global_embed"]}
    if buckets:
        dit["buckets"] = [{"index": k, "file": f"dit.bucket{k}.onnx", "t_max": 1 - k / buckets,
                           "t_min": 1 - (k + 1) / buckets} for k in range(buckets)]
        dit["bucket_edges"] = [1.0 + 1e-6] + [1 - k / buckets for k in range(1, buckets)] + [-1e-6]
    graphs = {"dit": dit, **{g: {"file": f"{g}.onnx", "files": [f"{g}.onnx"]}
                             for g in ("text_encoder", "conditioners", "vae_decoder")}}
    return {"schema_version": 1, "kind": "quadit-export", "model": {"model": "sao-mini"}, "scheme": "fp32",
            "dims": DIMS, "model_config": {"sample_size": sample_size, "sample_rate": 44100},
            "conditioning": {"text_max_length": 64}, "graphs": graphs}


def _fake_export(tmp_path: Path, buckets: int = 0) -> tuple[Path, dict]:
    """An export directory with a manifest and placeholder graph files (enough to plan a build)."""
    out = tmp_path / "export"
    out.mkdir()
    manifest = _manifest(buckets=buckets)
    for graph in [*manifest["graphs"].values(), *manifest["graphs"]["dit"].get("buckets", [])]:
        (out / graph["file"]).write_bytes(graph["file"].encode())
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest


@pytest.mark.parametrize("kwargs", [{"min_seconds": 0.0}, {"min_seconds": -1.0}, {"max_seconds": float("nan")},
                                    {"min_seconds": 5.0, "max_seconds": 2.0},
                                    {"min_seconds": 1.0, "opt_seconds": 8.0, "max_seconds": 4.0},
                                    {"opt_level": 6}, {"opt_level": -1}, {"batch_sizes": ()},
                                    {"batch_sizes": (2, 2)}, {"batch_sizes": (0,)}])
def test_build_settings_refuse_bad_values(kwargs):
    with pytest.raises(InputError):
        BuildSettings(**kwargs)


def test_build_settings_are_frozen_and_serialise_strongly_typed():
    settings = BuildSettings(min_seconds=2.0, opt_seconds=5.0, max_seconds=10.0, opt_level=4, timing_cache="tc")
    with pytest.raises(FrozenInstanceError):
        settings.opt_level = 1  # type: ignore[misc]
    doc = settings.to_json()
    assert doc["strongly_typed"] is True and doc["batch_sizes"] == [2, 1] and doc["version"] == 1
    assert json.loads(json.dumps(doc)) == doc


def test_latent_lengths_follow_the_runtime_rounding():
    manifest = _manifest()  # sao-mini: 524288 samples = 11.89 s = 256 latents
    assert latent_lengths(manifest, BuildSettings()) == (22, 256, 256)  # ceil(44100 / 2048) = 22
    assert latent_lengths(manifest, BuildSettings(min_seconds=0.5, opt_seconds=5.0, max_seconds=10.0)) == \
        (11, 108, 216)
    sao = _manifest(sample_size=2097152)  # Stable Audio Open 1.0: 47.55 s
    assert latent_lengths(sao, BuildSettings(opt_seconds=10.0))[1:] == (216, 1024)
    with pytest.raises(InputError, match="window"):
        latent_lengths(manifest, BuildSettings(max_seconds=30.0))
    with pytest.raises(InputError):
        latent_lengths(manifest, BuildSettings(min_seconds=20.0))


def test_profiles_one_per_cfg_batch_with_dynamic_length_only():
    manifest = _manifest()
    settings = BuildSettings(min_seconds=1.0, opt_seconds=5.0, max_seconds=10.0)
    dit = graph_profiles(manifest, "dit", settings)
    assert [p["x"] for p in dit] == [((2, 64, 22), (2, 64, 108), (2, 64, 216)), ((1, 64, 22), (1, 64, 108),
                                                                               (1, 64, 216))]
    assert dit[0]["t"] == ((2,),) * 3 and dit[1]["cross_attn_cond"] == ((1, 66, 256),) * 3
    assert dit[0]["global_embed"] == ((2, 512),) * 3
    assert graph_profiles(manifest, "vae_decoder", settings) == [{"latents": ((1, 64, 22), (1, 64, 108),
                                                                             (1, 64, 216))}]
    text = graph_profiles(manifest, "text_encoder", settings)
    assert text == [{"input_ids": ((1, 64), (1, 64), (2, 64)), "attention_mask": ((1, 64), (1, 64), (2, 64))}]


def _polygraphy_parse(command: str):
    """Parse a command line with polygraphy's own `convert` argument parser."""
    from polygraphy.tools.args import TrtConfigArgs, TrtLoadEngineBytesArgs, TrtLoadNetworkArgs
    from polygraphy.tools.convert import Convert

    argv = shlex.split(command)
    assert argv[:2] == ["polygraphy", "convert"]
    tool = Convert()
    args = tool.setup_parser().parse_args(argv[2:])
    tool.parse(args)
    return args, tool.arg_groups[TrtConfigArgs], tool.arg_groups[TrtLoadNetworkArgs], \
        tool.arg_groups[TrtLoadEngineBytesArgs]


def test_convert_command_has_the_profiles_and_flags_polygraphy_reads(tmp_path):
    export, manifest = _fake_export(tmp_path)
    settings = BuildSettings(min_seconds=1.0, opt_seconds=5.0, max_seconds=10.0, opt_level=4,
                             timing_cache=str(tmp_path / "timing.cache"))
    command = polygraphy_convert_command(export, "dit.onnx", tmp_path / "engines" / "dit.engine", settings)
    args, config, network, engine_bytes = _polygraphy_parse(command)
    assert args.convert_to == "trt" and args.output == str(tmp_path / "engines" / "dit.engine")
    profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in config.profile_dicts]
    assert profiles == graph_profiles(manifest, "dit", settings)
    assert network.strongly_typed is True
    assert config.builder_optimization_level == 4
    assert config.load_timing_cache == engine_bytes.save_timing_cache == str(tmp_path / "timing.cache")
    assert not any(getattr(config, flag) for flag in ("fp16", "int8", "bf16", "fp8"))  # deprecated flags stay off
    assert config.tf32 is True and "--tf32" in command  # Polygraphy clears TF32 unless asked
    no_tf32 = polygraphy_convert_command(export, "dit.onnx", tmp_path / "d.engine", BuildSettings(tf32=False))
    assert not _polygraphy_parse(no_tf32)[1].tf32 and BuildSettings().to_json()["tf32"] is True

    vae = polygraphy_convert_command(export, "vae_decoder.onnx", tmp_path / "vae_decoder.engine", BuildSettings())
    _, config, _, engine_bytes = _polygraphy_parse(vae)
    assert [p["latents"] for p in config.profile_dicts] == [([1, 64, 22], [1, 64, 256], [1, 64, 256])]
    assert config.builder_optimization_level == 3 and engine_bytes.save_timing_cache is None
    with pytest.raises(InputError, match="conditioners.onnx"):
        polygraphy_convert_command(export, "conditioners.onnx", tmp_path / "c.engine", BuildSettings())


def test_every_flag_of_the_convert_command_is_in_polygraphy_help(tmp_path):
    export, _ = _fake_export(tmp_path)
    command = polygraphy_convert_command(export, "dit.onnx", tmp_path / "dit.engine", BuildSettings(timing_cache="c"))
    help_text = subprocess.run([str(Path(sys.executable).parent / "polygraphy"), "convert", "--help"],
                               capture_output=True, text=True, check=True).stdout
    flags = {a for a in shlex.split(command) if a.startswith("-")}
    assert flags >= {"--convert-to", "--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes", "--strongly-typed",
                     "--builder-optimization-level", "--save-timing-cache", "--tf32", "-o"}
    for flag in flags:
        assert f"{flag} " in help_text or f"{flag}," in help_text or f"{flag}\n" in help_text, flag


def test_bucket_exports_get_one_dit_engine_per_bucket(tmp_path):
    export, manifest = _fake_export(tmp_path, buckets=3)
    items = build_plan(export, manifest)
    names = ["dit.bucket0", "dit.bucket1", "dit.bucket2", "text_encoder", "vae_decoder"]
    assert [(i.name, i.onnx, i.engine) for i in items] == [(n, f"{n}.onnx", f"{n}.engine") for n in names]
    command = polygraphy_convert_command(export, "dit.bucket1.onnx", tmp_path / "dit.bucket1.engine", BuildSettings())
    assert "dit.bucket1.onnx" in command and "x:[2,64,22]" in command
    broken = json.loads((export / "manifest.json").read_text())
    broken["graphs"]["dit"]["bucket_edges"] = broken["graphs"]["dit"]["bucket_edges"][:-1]
    with pytest.raises(InputError, match="bucket_edges"):
        build_plan(export, broken)


def test_graphs_tensorrt_cannot_parse_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    export, manifest = _fake_export(tmp_path)
    uint8 = [helper.make_tensor_value_info(n, TensorProto.UINT8, [2, 2]) for n in "ab"]
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", uint8,
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])])
    onnx.save(helper.make_model(graph), str(export / "dit.onnx"))
    with pytest.raises(InputError, match="MatMulInteger"):
        check_parsable(export, build_plan(export, manifest)[:1])


@pytest.mark.skipif(HAS_TRT_GPU, reason="this machine can build engines")
def test_build_script_without_tensorrt_prints_commands_exits_2_and_writes_nothing(mini_export, tmp_path):
    (export, _), out = mini_export, tmp_path / "engines"
    proc = run_script("build_engines.py", "--export", str(export), "--out", str(out), "--max-seconds", "5",
                      "--timing-cache", str(tmp_path / "timing.cache"))
    assert "TensorRT" in one_line_error(proc) and "Traceback" not in proc.stderr
    commands = [line for line in proc.stdout.splitlines() if line.startswith("polygraphy convert")]
    assert len(commands) == 3
    for graph, command in zip(("dit", "text_encoder", "vae_decoder"), commands):
        args, *_ = _polygraphy_parse(command)
        assert args.model_file == str(export / f"{graph}.onnx") and args.output == str(out / f"{graph}.engine")
    assert "x:[2,64,108]" in commands[0] and "x:[1,64,22]" in commands[0]  # 5 s max -> 108 latents
    assert not out.exists() and not list(tmp_path.glob(".engines*")) and not (tmp_path / "timing.cache").exists()


@pytest.mark.parametrize("args", [["--min-seconds", "8", "--max-seconds", "2"], ["--max-seconds", "60"],
                                  ["--opt-level", "9"], ["--timing-cache", "{tmp}/a-file/cache/t.cache"],
                                  ["--timing-cache", "{tmp}"]])
def test_build_script_bad_settings_exit_2(mini_export, tmp_path, args):
    """Refused before any engine is built, TensorRT or not: a timing cache whose directory cannot be created
    (a file sits where a directory should) or that is a directory would otherwise end in a traceback after the
    first engine."""
    export, _ = mini_export
    (tmp_path / "a-file").write_text("not a directory")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_script("build_engines.py", "--export", str(export), "--out", str(tmp_path / "engines"), *args)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
    assert not (tmp_path / "engines").exists()
    if "--timing-cache" in args:
        assert "timing-cache" in proc.stderr and "polygraphy convert" not in proc.stdout


def _engines_dir(tmp_path: Path, export: Path) -> Path:
    from calibration.artifact import sha256_file

    out = tmp_path / "engines"
    out.mkdir()
    engines = {}
    for graph in ("dit", "text_encoder", "vae_decoder"):
        (out / f"{graph}.engine").write_bytes(b"plan")
        engines[graph] = {"graph": graph, "onnx": f"{graph}.onnx", "engine": f"{graph}.engine", "bucket": None,
                          "tensorrt_version": MACHINE.tensorrt_version,
                          "gpu": {"name": MACHINE.gpu_name, "compute_capability": MACHINE.compute_capability},
                          "source_sha256": {f"{graph}.onnx": sha256_file(export / f"{graph}.onnx")}}
    (out / ENGINES_JSON).write_text(json.dumps({"schema_version": 1, "engines": engines}))
    return out


def test_engine_built_on_another_board_of_the_same_sm_runs_with_a_warning(tmp_path, caplog):
    """Engines are tied to the compute capability (and TensorRT version), not to the board's name: an engine
    from an H100 SXM runs on an H100 PCIe (both sm 9.0), with its kernels timed on the other board."""
    export, _ = _fake_export(tmp_path)
    engines = _engines_dir(tmp_path, export)
    doc = json.loads((engines / ENGINES_JSON).read_text())
    doc["engines"]["vae_decoder"]["gpu"]["name"] = "NVIDIA L40S"
    (engines / ENGINES_JSON).write_text(json.dumps(doc))
    with caplog.at_level("WARNING"):
        assert "vae_decoder" in check_engine_metadata(engines / ENGINES_JSON, export, MACHINE)["engines"]
    assert "NVIDIA L40S" in caplog.text and "same sm" in caplog.text


@pytest.mark.parametrize("change,match", [
    (lambda doc, export, out: doc["dit"].update(tensorrt_version="10.8.0.43"), "TensorRT 10.8.0.43"),
    (lambda doc, export, out: doc["text_encoder"]["gpu"].update(compute_capability="8.9"), "sm 8.9"),
    (lambda doc, export, out: doc["dit"]["source_sha256"].update({"dit.onnx": "0" * 64}), "sha256"),
    (lambda doc, export, out: (export / "vae_decoder.onnx").write_bytes(b"re-exported"), "vae_decoder.onnx"),
    (lambda doc, export, out: (out / "text_encoder.engine").unlink(), "text_encoder.engine listed"),
])
def test_engine_metadata_mismatch_is_refused(tmp_path, change, match):
    export, _ = _fake_export(tmp_path)
    engines = _engines_dir(tmp_path, export)
    assert set(check_engine_metadata(engines / ENGINES_JSON, export, MACHINE)["engines"]) == {
        "dit", "text_encoder", "vae_decoder"}
    doc = json.loads((engines / ENGINES_JSON).read_text())
    change(doc["engines"], export, engines)
    (engines / ENGINES_JSON).write_text(json.dumps(doc))
    with pytest.raises(InputError, match=match) as info:
        check_engine_metadata(engines / ENGINES_JSON, export, MACHINE)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="engines directory"):
        check_engine_metadata(tmp_path / "nowhere" / ENGINES_JSON, export, MACHINE)


def test_build_engines_drives_polygraphy_and_writes_checkable_metadata(mini_export, tmp_path, fake_trt):
    from engines.runtime.tensorrt import build_engines

    export, manifest = mini_export
    settings = BuildSettings(max_seconds=5.0, opt_level=2, timing_cache=str(tmp_path / "timing.cache"))
    doc = build_engines(export, tmp_path / "engines", settings)
    graphs = ("dit", "text_encoder", "vae_decoder")
    assert [Path(c.network.path).name for c in fake_trt.calls] == [f"{g}.onnx" for g in graphs]
    for call, graph in zip(fake_trt.calls, graphs):
        assert call.network.strongly_typed is True
        assert call.config.builder_optimization_level == 2 and not call.config.fp16 and not call.config.int8
        assert call.config.timing_cache_path == call.save_timing_cache == str(tmp_path / "timing.cache")
        profiles = [{n: (tuple(s.min), tuple(s.opt), tuple(s.max)) for n, s in p.items()} for p in call.config.profiles]
        assert profiles == graph_profiles(manifest, graph, settings)
    out = tmp_path / "engines"
    assert sorted(p.name for p in out.iterdir()) == sorted([ENGINES_JSON] + [f"{g}.engine" for g in graphs])
    assert (out / "dit.engine").read_bytes() == b"plan:dit.onnx"
    assert json.loads((out / ENGINES_JSON).read_text()) == doc
    entry = doc["engines"]["dit"]
    assert entry["tensorrt_version"] == MACHINE.tensorrt_version and entry["settings"]["strongly_typed"] is True
    assert entry["source_sha256"] == {"dit.onnx": manifest["graphs"]["dit"]["sha256"]["dit.onnx"]}
    assert entry["profiles"][1]["x"] == {"min": [1, 64, 22], "opt": [1, 64, 108], "max": [1, 64, 108]}
    assert doc["conditioners"]["backend"] == "onnxruntime"
    assert check_engine_metadata(out / ENGINES_JSON, export, MACHINE) == doc
    with pytest.raises(InputError, match="this machine has 10.8.0"):
        check_engine_metadata(out / ENGINES_JSON, export, MachineFacts("10.8.0", MACHINE.gpu_name, "9.0"))


def test_a_failed_build_is_one_line_and_leaves_nothing(mini_export, tmp_path, fake_trt):
    from engines.runtime.tensorrt import build_engines

    export, _ = mini_export
    fake_trt.fail_on = "vae_decoder.onnx"
    with pytest.raises(InputError, match="could not build vae_decoder.onnx: In node 3") as info:
        build_engines(export, tmp_path / "engines", BuildSettings())
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


class _FakeRunner:
    """Stands in for an engine: v = x * scale + t, and records the batch it saw."""

    def __init__(self, scale: float) -> None:
        self.scale, self.batches = scale, []

    def __call__(self, feeds):
        self.batches.append(feeds["x"].shape[0])
        return {"v": feeds["x"] * self.scale + feeds["t"][:, None, None] + feeds["global_embed"][:, :1, None]
                + feeds["cross_attn_cond"].mean(dim=(1, 2))[:, None, None]}


def test_trt_dit_batches_cfg_like_the_onnx_runtime_dit():
    from engines.runtime.backends import OrtDiT

    runner = _FakeRunner(2.0)
    dit = TrtDiT([runner])
    x, t = torch.randn(1, 64, 10), torch.tensor([0.7])
    cross, glob = torch.randn(1, 66, 256), torch.randn(1, 512)

    class Session:  # ONNX Runtime's session API over the same fake
        def run(self, _names, feeds):
            return [runner({k: torch.from_numpy(v) for k, v in feeds.items()})["v"].numpy()]

    ort = OrtDiT(Session())
    for cfg in (1.0, 7.0):
        assert torch.allclose(dit(x, t, cross_attn_cond=cross, global_cond=glob, cfg_scale=cfg),
                              ort(x, t, cross_attn_cond=cross, global_cond=glob, cfg_scale=cfg))
    assert runner.batches == [1, 1, 2, 2] and dit.calls == 2
    with pytest.raises(ValueError):
        dit(x, t, cross_attn_cond=cross, global_cond=glob, cfg_scale=7.0, scale_phi=0.7)


def test_trt_dit_picks_the_bucket_engine_from_t():
    from calibration.collector import BucketSpec

    runners = [_FakeRunner(float(k)) for k in range(3)]
    dit = TrtDiT(runners, BucketSpec((1.0 + 1e-6, 0.6, 0.3, -1e-6)))
    x, cross, glob = torch.randn(1, 64, 4), torch.zeros(1, 66, 256), torch.zeros(1, 512)
    for t, k in ((0.95, 0), (0.6, 0), (0.45, 1), (0.3, 1), (0.1, 2)):
        dit(x, torch.tensor([t]), cross_attn_cond=cross, global_cond=glob, cfg_scale=7.0)
        assert runners[k].batches[-1] == 2 and sum(len(r.batches) for r in runners) == dit.calls
    assert [len(r.batches) for r in runners] == [2, 2, 1]
    with pytest.raises(ValueError, match="different buckets"):
        dit.run(x.repeat(2, 1, 1), torch.tensor([0.9, 0.1]), cross.repeat(2, 1, 1), glob.repeat(2, 1))
    with pytest.raises(ValueError):
        TrtDiT(runners)


def test_generate_refuses_engines_without_tensorrt_backend_and_the_reverse(mini_export, tmp_path):
    export, _ = mini_export
    common = ["--export", str(export), "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "a.wav")]
    for extra in (["--backend", "tensorrt"], ["--engines", str(tmp_path)],
                  ["--backend", "torch", "--engines", str(tmp_path)]):
        proc = run_script("generate.py", *common, *extra)
        assert proc.returncode == 2 and proc.stderr.startswith("error:") and "--engines" in proc.stderr, extra
    if not HAS_TRT_GPU:  # the tensorrt backend itself, here: one line, no traceback
        proc = run_script("generate.py", *common, "--backend", "tensorrt", "--engines", str(tmp_path))
        assert proc.returncode == 2 and proc.stderr.startswith("error: TensorRT") and "Traceback" not in proc.stderr
    assert not (tmp_path / "a.wav").exists()


# --- TensorRT + GPU: written against the documented API (TensorRT 10, Polygraphy); skipped without them ---

TRT_SETTINGS = BuildSettings(min_seconds=0.5, opt_seconds=1.0, max_seconds=2.0, opt_level=1)


@pytest.fixture(scope="module")
def mini_engines(mini_export, tmp_path_factory):
    from engines.runtime.tensorrt import build_engines

    export, _ = mini_export
    out = tmp_path_factory.mktemp("trt") / "engines"
    return out, build_engines(export, out, TRT_SETTINGS)


def _ort_dit(export: Path):
    from engines.runtime.backends import OrtDiT
    from exporter.onnx.torch_export import ort_session

    return OrtDiT(ort_session(export / "dit.onnx"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / b.abs().max())


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_dit_matches_onnx_runtime(mini_export, mini_engines, cuda_graph):
    from engines.runtime.tensorrt import EngineRunner, load_engine

    (export, _), (out, _) = mini_export, mini_engines
    trt_dit = TrtDiT([EngineRunner(load_engine(out / "dit.engine"), "dit", cuda_graph=cuda_graph)])
    ort_dit = _ort_dit(export)
    g = torch.Generator().manual_seed(3)
    for length in (11, 30, 44):  # min, between, max of the profile
        x, t = torch.randn(1, 64, length, generator=g), torch.rand(1, generator=g)
        cross, glob = torch.randn(1, 66, 256, generator=g), torch.randn(1, 512, generator=g)
        for cfg in (7.0, 1.0, 7.0):  # batch 2 and batch 1 profiles; the repeat replays a captured graph
            got = trt_dit(x, t, cross_attn_cond=cross, global_cond=glob, cfg_scale=cfg)
            want = ort_dit(x, t, cross_attn_cond=cross, global_cond=glob, cfg_scale=cfg)
            assert got.shape == want.shape and got.device.type == "cpu"
            assert _rel(got, want) < 1e-3, (length, cfg)
        on_gpu = trt_dit(x.cuda(), t.cuda(), cross_attn_cond=cross.cuda(), global_cond=glob.cuda(), cfg_scale=7.0)
        assert on_gpu.is_cuda and _rel(on_gpu, want) < 1e-3
    with pytest.raises(InputError, match="profiles"):
        trt_dit(torch.randn(1, 64, 45), t, cross_attn_cond=cross, global_cond=glob, cfg_scale=7.0)


@pytest.mark.trt
@pytest.mark.gpu
def test_bucket_engines_are_chosen_by_t(mini_export, tmp_path):
    from engines.runtime.tensorrt import TrtBackend, build_engines

    export, _ = mini_export
    bucketed = tmp_path / "export"
    shutil.copytree(export, bucketed)
    manifest = json.loads((bucketed / "manifest.json").read_text())
    two = _manifest(buckets=2)["graphs"]["dit"]  # edges 1, 0.5, 0: same weights, so outputs match ORT's
    manifest["graphs"]["dit"].update(buckets=two["buckets"], bucket_edges=two["bucket_edges"])
    for k in range(2):
        shutil.copy(bucketed / "dit.onnx", bucketed / f"dit.bucket{k}.onnx")
    (bucketed / "manifest.json").write_text(json.dumps(manifest))
    doc = build_engines(bucketed, tmp_path / "engines", TRT_SETTINGS)
    assert {"dit.bucket0", "dit.bucket1"} <= set(doc["engines"]) and "dit" not in doc["engines"]
    backend = TrtBackend(tmp_path / "engines", bucketed, manifest)
    calls = []
    for k, runner in enumerate(backend.dit.runners):
        backend.dit.runners[k] = lambda feeds, k=k, runner=runner: calls.append(k) or runner(feeds)
    x, cross, glob = torch.randn(1, 64, 20), torch.randn(1, 66, 256), torch.randn(1, 512)
    for t in (0.9, 0.2):
        got = backend.dit(x, torch.tensor([t]), cross_attn_cond=cross, global_cond=glob, cfg_scale=7.0)
        want = _ort_dit(export)(x, torch.tensor([t]), cross_attn_cond=cross, global_cond=glob, cfg_scale=7.0)
        assert _rel(got, want) < 1e-3
    assert calls == [0, 1]


@pytest.mark.trt
@pytest.mark.gpu
def test_tensorrt_pipeline_tracks_onnx_runtime(mini_export, mini_engines):
    from engines.runtime.pipeline import GenerateOptions, open_pipeline

    (export, _), (out, doc) = mini_export, mini_engines
    assert set(doc["engines"]) == {"dit", "text_encoder", "vae_decoder"}
    assert doc["engines"]["dit"]["profiles"][0]["x"] == {"min": [2, 64, 11], "opt": [2, 64, 22], "max": [2, 64, 44]}
    assert check_engine_metadata(out / ENGINES_JSON, export)["engines"].keys() == doc["engines"].keys()
    opts = GenerateOptions(prompt="a dog barking in a large hall", seconds=1.0, steps=12, cfg_scale=7.0, seed=5)
    trt = open_pipeline(export, "tensorrt", out).generate(opts)
    ort = open_pipeline(export, "onnxruntime").generate(opts)
    assert trt.latents.shape == ort.latents.shape and _rel(trt.latents, ort.latents) < 1e-2
    assert trt.audio.shape == ort.audio.shape == (1, 2, 44100) and torch.isfinite(trt.audio).all()
    assert _rel(trt.audio, ort.audio) < 5e-2
