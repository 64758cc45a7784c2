"""The UNet family's quantization stage and its accuracy report (AudioLDM, TANGO).

`unet_quant_stages` returns the stage `export_unet_model` runs on its temporary directory: calibrate the
PyTorch UNet on seed prompts (`engines.calibrate.unet`), quantize `unet.onnx` (`exporter.stages.unet_quantized`)
and measure it, on held-out prompts, against the FP32 graph the export just checked against diffusers:

- step SQNR: along the FP32 trajectory, each step's UNet input fed to both graphs (the error one call adds);
- final-latent SNR: the whole scheduler loop run with each graph from the same noise (what accumulates);
- audio SNR: both final latents decoded by the FP32 VAE and vocoder graphs (what the user hears).

Peers at equal bits in the same table, on the same Conv2d/Linear layers: ONNX Runtime's `quantize_static` (QDQ,
per-channel symmetric INT8 weights, per-tensor INT8 activations, MinMax over the calibration prompts' UNet
feeds), ModelOpt's INT8_SMOOTHQUANT_CFG (`modelopt_peer`; `--no-modelopt` leaves it out), and for the TensorRT
target the unquantized FP16 base graph (what FP16 alone costs).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch

from calibration.prompts import select_prompts
from engines.calibrate.unet import UNetCalibrationSettings, calibrate_unet
from engines.evaluation.accuracy import heldout_prompts, sqnr_db
from exporter.errors import InputError
from exporter.models.unet_layers import quantizable_unet_layers
from exporter.models.unet_sampling import check_seconds, sample_latents, tokenize
from exporter.onnx.torch_export import ort_session
from exporter.passes.conv_quant import locate_sites
from exporter.stages.unet_quantized import UNetQuantOptions, export_fp16_unet, quantize_unet_graph, write_quantized_unet

log = logging.getLogger(__name__)
HELDOUT_SEED = 1234
Stage = Callable[[Path, dict[str, Any]], None]


class FeedRecorder:
    """A UNet call that answers with `graph` and keeps every feed it was given."""

    def __init__(self, graph: Any) -> None:
        self.graph, self.feeds = graph, []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        feed = {"sample": x.float().numpy(), "timestep": t.float().numpy(), **{k: v.float().numpy() for k, v in cond.items()}}
        self.feeds.append(feed)
        return torch.from_numpy(self.graph.run(["noise_pred"], feed)[0])


class TorchUNetSession:
    """A PyTorch UNet (ModelOpt's fake-quantized copy) answering like an ONNX Runtime session of unet.onnx."""

    def __init__(self, family: str, unet: torch.nn.Module) -> None:
        self.family, self.unet = family, unet

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        from exporter.models.unet_text import unet_kwargs

        with torch.no_grad():
            return self.unet(x, t, **unet_kwargs(self.family, cond)).sample

    def run(self, _names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        cond = {k: torch.from_numpy(v) for k, v in feed.items() if k not in ("sample", "timestep")}
        return [self(torch.from_numpy(feed["sample"]), torch.from_numpy(feed["timestep"]), cond).numpy()]


class ReportBed:
    """The export's FP32 text, VAE and vocoder sessions and the loop settings of the report."""

    def __init__(self, tmp: Path, manifest: dict[str, Any], steps: int, seconds: float) -> None:
        from transformers import AutoTokenizer

        graphs = manifest["graphs"]
        self.sessions = {n: ort_session(tmp / graphs[n]["file"]) for n in ("text_encoder", "vae_decoder", "vocoder")}
        self.tokenizer = AutoTokenizer.from_pretrained(str(tmp / "tokenizer"), local_files_only=True)
        self.manifest, self.dims = manifest, manifest["dims"]
        self.steps, self.seconds = steps, seconds
        self.cfg = float(manifest["sampler_defaults"].get("cfg_scale", 1.0))
        self.inputs = manifest["conditioning"]["inputs"]

    def encode(self, prompt: str) -> dict[str, torch.Tensor]:
        ids, mask = tokenize(self.tokenizer, [prompt], int(self.dims["text_length"]))
        out = self.sessions["text_encoder"].run(self.inputs, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        return {k: torch.from_numpy(v) for k, v in zip(self.inputs, out)}

    def latents(self, unet: Callable[..., torch.Tensor], prompt: str, seed: int) -> torch.Tensor:
        uncond = self.encode("") if self.cfg > 1.0 else None
        return sample_latents(self.dims, self.manifest["scheduler_config"], unet, self.encode(prompt), uncond,
                              self.steps, self.cfg, self.seconds, seed)

    def audio(self, latents: torch.Tensor) -> np.ndarray:
        mel = self.sessions["vae_decoder"].run(["mel"], {"latents": latents.float().numpy()})[0]
        return self.sessions["vocoder"].run(["waveform"], {"mel": mel[:, 0]})[0]


def measure(bed: ReportBed, reference: Any, candidates: dict[str, Any], prompts: Sequence[str]) -> list[dict[str, Any]]:
    """One row per candidate session: step SQNR, final-latent SNR and audio SNR against `reference` (dB,
    means over `prompts`; see the module docstring)."""
    rows = {name: {"candidate": name, "step_sqnr": [], "latent_snr": [], "audio_snr": []} for name in candidates}
    for i, prompt in enumerate(prompts):
        seed = HELDOUT_SEED + i
        ref_call = FeedRecorder(reference)
        ref_latents = bed.latents(ref_call, prompt, seed)
        ref_audio = bed.audio(ref_latents)
        for name, session in candidates.items():
            steps = [sqnr_db(reference.run(["noise_pred"], f)[0], session.run(["noise_pred"], f)[0])
                     for f in ref_call.feeds]
            latents = bed.latents(FeedRecorder(session), prompt, seed)
            row = rows[name]
            row["step_sqnr"].append(float(np.mean(steps)))
            row["latent_snr"].append(sqnr_db(ref_latents.numpy(), latents.numpy()))
            row["audio_snr"].append(sqnr_db(ref_audio, bed.audio(latents)))
    out = []
    for row in rows.values():
        summary = {"candidate": row["candidate"]}
        for key in ("step_sqnr", "latent_snr", "audio_snr"):
            summary[f"{key}_db"] = round(float(np.mean(row[key])), 2)
            summary[f"{key}_per_prompt_db"] = [round(v, 2) for v in row[key]]
        out.append(summary)
    return out


def calibration_feeds(bed: ReportBed, reference: Any, prompts: Sequence[str], seed: int) -> list[dict[str, np.ndarray]]:
    """The FP32 UNet's feeds over the calibration prompts (ONNX Runtime's calibrator reads these)."""
    feeds: list[dict[str, np.ndarray]] = []
    for i, prompt in enumerate(prompts):
        rec = FeedRecorder(reference)
        bed.latents(rec, prompt, seed + i)
        feeds.extend(rec.feeds)
    return feeds


def ort_peer(fp32: Path, layers: Sequence[str], feeds: Sequence[dict[str, np.ndarray]], out: Path) -> dict[str, Any]:
    """ONNX Runtime's `quantize_static` on the same Conv/MatMul/Gemm nodes quadit quantizes (found again after
    `quant_pre_process` by their weight initializers)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from engines.evaluation.ort_quantizer_baseline import TrajectoryReader, calibration_stride

    with tempfile.TemporaryDirectory(prefix="quadit-ortq-") as tmp:
        # as ONNX Runtime's docs ask, less the symbolic shape inference, which cannot finish on the UNet graph
        # (onnxruntime 1.31: "Incomplete symbolic shape inference" on its Resize/attention reshapes)
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        sites = locate_sites(onnx.load(str(fp32)), list(layers))
        weights = {s.weight for s in sites.values()}
        nodes = [n.name for n in onnx.load(str(pre)).graph.node
                 if n.op_type in ("Conv", "MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in weights]
        quantize_static(str(pre), str(out), TrajectoryReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"CalibStridedMinMax": calibration_stride(len(feeds))})
    log.info("ONNX Runtime quantize_static: %d of %d layers", len(nodes), len(layers))
    return {"label": "ORT quantize_static (QDQ, per-channel INT8 weights, per-tensor INT8 activations, MinMax)",
            "nodes": len(nodes), "calibration_feeds": len(feeds)}


def modelopt_peer(model: Any, layers: Sequence[str], bed: "ReportBed", prompts: Sequence[str], seed: int
                  ) -> tuple[TorchUNetSession, dict[str, Any]]:
    """ModelOpt's INT8_SMOOTHQUANT_CFG on the same Conv2d/Linear layers (its diffusers example's recipe:
    INT8 per-channel weights, per-tensor activations; SmoothQuant on the Linears), calibrated by the PyTorch
    UNet under the same scheduler loop and prompts; fake-quantized, so it runs on the CPU."""
    from engines.evaluation.modelopt_baseline import modelopt_quantize

    def forward_loop(unet: torch.nn.Module) -> None:
        for i, prompt in enumerate(prompts):
            bed.latents(TorchUNetSession(model.family, unet), prompt, seed + i)

    unet, info = modelopt_quantize(model.unet, "w8a8", forward_loop, layers)
    info.pop("layers", None)
    return TorchUNetSession(model.family, unet), info


def markdown(rows: Sequence[dict[str, Any]], context: dict[str, Any]) -> str:
    lines = [f"# UNet accuracy against FP32 ({context['model']}, {context['target']} target)", "",
             f"{context['prompts']} held-out prompts, {context['steps']} steps, {context['seconds']} s; dB, higher is "
             "better.", "", "| candidate | step SQNR | final-latent SNR | audio SNR |", "|---|---|---|---|"]
    lines += [f"| {r['candidate']} | {r['step_sqnr_db']:.2f} | {r['latent_snr_db']:.2f} | {r['audio_snr_db']:.2f} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def unet_quant_stages(model: Any, options: UNetQuantOptions, ort_baseline: bool = True,
                      modelopt: bool = True, artifact: tuple[Any, list[str], dict[str, Any]] | None = None) -> list[Stage]:
    """The stage that quantizes `unet.onnx` and writes report.json / report.md (see the module docstring);
    `artifact` (`engines.calibrate.unet_artifact.read_unet_artifact`) replaces calibrating here."""
    dims = model.dims()
    seconds = {k: float(v if v is not None else dims["default_seconds"])
               for k, v in (("calib", options.calib_seconds), ("report", options.report_seconds))}
    for value in seconds.values():
        check_seconds(dims, value)
    if artifact is not None and (options.weight_rounding == "gptq" or options.auto_precision) and not artifact[0].xtx:
        raise InputError("the calibration artifact has no second moments (GPTQ rounding and --auto-precision need "
                         "them): re-run quadit calibrate without --no-second-moments")
    try:
        calib_prompts = artifact[1] if artifact is not None else select_prompts("seed", options.calib_prompts)
        report_prompts = (heldout_prompts(calib_prompts, options.report_prompts, HELDOUT_SEED)
                          if options.report_prompts else [])
    except ValueError as exc:
        raise InputError(str(exc)) from None
    layers = [name for name, _ in quantizable_unet_layers(model.unet)]

    def stage(tmp: Path, manifest: dict[str, Any]) -> None:
        settings = UNetCalibrationSettings(steps=options.calib_steps, buckets=min(options.calib_buckets,
                                                                                  options.calib_steps),
                                           seconds=seconds["calib"])
        calibration = artifact[0] if artifact is not None else calibrate_unet(
            model, calib_prompts, settings, second_moments=options.weight_rounding == "gptq" or options.auto_precision)
        with tempfile.TemporaryDirectory(prefix="quadit-unetq-") as scratch_dir:
            scratch = Path(scratch_dir)
            fp32 = scratch / "unet.fp32.onnx"
            shutil.copyfile(tmp / manifest["graphs"]["unet"]["file"], fp32)
            base = fp32
            if options.target == "tensorrt":
                base = scratch / "unet.fp16.onnx"
                export_fp16_unet(model, base)
            precisions = None
            if options.auto_precision:
                from engines.evaluation.unet_sensitivity import choose_unet_precisions

                precisions = choose_unet_precisions(base, layers, calibration, options, tmp)
            quantized, record = quantize_unet_graph(base, layers, calibration.edges, calibration.ch_absmax, options,
                                                    calibration.xtx, precisions)
            if options.residual_qdq:
                record["__residual_qdq__"] = residual_stage(quantized, base, tmp, manifest, calib_prompts, options,
                                                            seconds["calib"])
            write_quantized_unet(quantized, record, tmp, manifest, options, calibration.summary)
            if report_prompts:
                # the graph as written into the export (measured as deployed, not a second copy of it)
                _report(model, tmp, manifest, fp32, base, tmp / manifest["graphs"]["unet"]["file"], layers,
                        calib_prompts, report_prompts, options, seconds["report"], ort_baseline, modelopt, scratch)

    return [stage]


def residual_stage(quantized: onnx.ModelProto, base: Path, tmp: Path, manifest: dict[str, Any],
                   calib_prompts: Sequence[str], options: UNetQuantOptions, seconds: float) -> dict[str, Any]:
    """TensorRT's residual-Add Q/DQ (`exporter.passes.residual_qdq`): the residual tensors' abs-max measured on the
    base graph over the first calibration prompts' trajectories, then the Q/DQ placed in `quantized`."""
    from exporter.passes.residual_qdq import place_residual_qdq, residual_adds

    tensors = sorted({a["residual"] for a in residual_adds(quantized)})
    probe = onnx.load(str(base))
    inits = {i.name: i.data_type for i in probe.graph.initializer}
    ftype = next(inits[n.input[1]] for n in probe.graph.node if n.op_type == "Conv" and n.input[1] in inits)
    probe.graph.output.extend([onnx.helper.make_tensor_value_info(t, ftype, None) for t in tensors])
    path = tmp.parent / f".{tmp.name}.residual-probe.onnx"
    try:
        onnx.save(probe, str(path))
        session = ort_session(path)
        bed = ReportBed(tmp, manifest, options.calib_steps, seconds)
        ranges = dict.fromkeys(tensors, 0.0)

        class Probe:
            def run(self, names: Sequence[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
                outs = session.run(["noise_pred", *tensors], feed)
                for t, v in zip(tensors, outs[1:]):
                    ranges[t] = max(ranges[t], float(np.abs(v.astype(np.float32)).max()))
                return outs[:1]

        for i, prompt in enumerate(calib_prompts[:2]):
            bed.latents(FeedRecorder(Probe()), prompt, i)
    finally:
        path.unlink(missing_ok=True)
    return place_residual_qdq(quantized, ranges)


def _report(model: Any, tmp: Path, manifest: dict[str, Any], fp32: Path, base: Path, q_path: Path,
            layers: Sequence[str], calib_prompts: Sequence[str], prompts: Sequence[str], options: UNetQuantOptions,
            seconds: float, ort_baseline: bool, modelopt: bool, scratch: Path) -> None:
    bed = ReportBed(tmp, manifest, options.report_steps, seconds)
    reference = ort_session(fp32)
    candidates = {f"quadit {options.scheme} ({options.method})": ort_session(q_path)}
    if base != fp32:
        candidates["FP16 base (unquantized)"] = ort_session(base)
    peer = modelopt_info = None
    if ort_baseline:
        feeds = calibration_feeds(bed, reference, calib_prompts[:max(1, min(4, len(calib_prompts)))], seed=0)
        peer = ort_peer(fp32, layers, feeds, scratch / "unet.ortq.onnx")
        # basic optimisations only: at the extended level onnxruntime 1.31's transpose optimizer rewrites the
        # peer's Q/DQ around a Transpose into a QuantizeLinear with an INT8 output_dtype and a UINT8 zero point,
        # and the session refuses the graph ("output_dtype INT8 does not match y_zero_point type UINT8")
        candidates["ONNX Runtime quantize_static w8a8"] = ort_session(scratch / "unet.ortq.onnx",
                                                                      {"graph_optimization_level": "basic"})
    if modelopt:
        calib = list(calib_prompts[:max(1, min(4, len(calib_prompts)))])
        candidates["ModelOpt INT8_SMOOTHQUANT_CFG (PyTorch fake quant)"], modelopt_info = modelopt_peer(
            model, layers, bed, calib, seed=0)
    rows = measure(bed, reference, candidates, prompts)
    context = {"model": manifest["model"].get("model"), "target": options.target, "prompts": len(prompts),
               "steps": options.report_steps, "seconds": seconds, "heldout_prompts": list(prompts),
               "reference": "FP32 unet.onnx (parity-checked against diffusers)", "ort_peer": peer,
               "modelopt_peer": modelopt_info}
    (tmp / "report.json").write_text(json.dumps({"rows": rows, "context": context}, indent=2) + "\n")
    (tmp / "report.md").write_text(markdown(rows, context))
    ours = rows[0]
    manifest["report"] = {"file": "report.json", **{k: ours[k] for k in ("step_sqnr_db", "latent_snr_db", "audio_snr_db")}}
    for row in rows:
        log.info("%-45s step SQNR %6.2f dB  final-latent SNR %6.2f dB  audio SNR %6.2f dB", row["candidate"],
                 row["step_sqnr_db"], row["latent_snr_db"], row["audio_snr_db"])
