"""Backends behind one interface: the graphs of an export, run by PyTorch or ONNX Runtime.

A backend computes conditioning tensors and decodes latents; its `dit` is a callable with the call
signature of stable-audio-tools' `DiTWrapper`, so the runtime hands it to stable-audio-tools' own
`sample_k` (k-diffusion's v-denoiser and dpmpp-3m-sde) exactly as `generate_diffusion_cond` does.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

log = logging.getLogger(__name__)


class Backend(Protocol):
    name: str
    dit: Any  # DiTWrapper-compatible callable

    def conditioning(self, metadata: list[dict[str, Any]]) -> dict[str, Any]:
        """stable-audio-tools MultiConditioner output: id -> [tensor, mask]."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, C, L] -> audio [B, 2, L * ratio]."""


class TorchBackend:
    """The reference: the stable-audio-tools model itself."""

    name = "torch"

    def __init__(self, wrapper: Any, device: str = "cpu") -> None:
        self.wrapper = wrapper.to(device)
        self.dit = wrapper.model
        self.device = device

    def conditioning(self, metadata: list[dict[str, Any]]) -> dict[str, Any]:
        return self.wrapper.conditioner(metadata, self.device)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.wrapper.pretransform.decode(latents)


class OrtDiT:
    """A DiT graph run by ONNX Runtime, callable like `DiTWrapper.forward`.

    Classifier-free guidance follows `DiffusionTransformer.forward`: conditioned and unconditioned
    inputs as one batch of 2 (the unconditioned cross-attention tokens are zeros, the global embedding
    is shared), then uncond + (cond - uncond) * cfg_scale.
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.calls = 0

    def run(self, x: torch.Tensor, t: torch.Tensor, cross: torch.Tensor, global_embed: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        feeds = {"x": x.float().numpy(), "t": t.float().numpy(), "cross_attn_cond": cross.float().numpy(),
                 "global_embed": global_embed.float().numpy()}
        return torch.from_numpy(self.session.run(["v"], feeds)[0])

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cross_attn_cond: torch.Tensor | None = None,
                 global_cond: torch.Tensor | None = None, cfg_scale: float = 1.0, scale_phi: float = 0.0,
                 **_ignored: Any) -> torch.Tensor:
        if cross_attn_cond is None or global_cond is None:
            raise ValueError("the exported DiT needs cross-attention and global conditioning")
        if scale_phi != 0.0:
            raise ValueError("CFG rescale (scale_phi) is not supported by the ONNX backend")
        if cfg_scale == 1.0:
            return self.run(x, t, cross_attn_cond, global_cond)
        batch = self.run(torch.cat([x, x]), torch.cat([t, t]),
                         torch.cat([cross_attn_cond, torch.zeros_like(cross_attn_cond)]),
                         torch.cat([global_cond, global_cond]))
        cond, uncond = torch.chunk(batch, 2, dim=0)
        return uncond + (cond - uncond) * cfg_scale


class BucketedSession:
    """Per-timestep-bucket DiT graphs (the per-bucket-graph policy) behind one `run`: the graph is chosen
    from `t` with calibration's bucket rule. All batch entries share one t in the sampler (CFG batch)."""

    def __init__(self, sessions: list[Any], edges: list[float]) -> None:
        from calibration.collector import BucketSpec

        self.sessions = sessions
        self.spec = BucketSpec(tuple(edges))
        if self.spec.count != len(sessions):
            raise ValueError(f"{len(sessions)} bucket graphs for {self.spec.count} buckets")

    def run(self, outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        t = np.asarray(feeds["t"]).reshape(-1)
        if not np.all(t == t[0]):
            raise ValueError("per-bucket DiT graphs need one t per call")
        return self.sessions[self.spec.bucket_of(float(t[0]))].run(outputs, feeds)


def dit_session(export_dir: Path, entry: dict[str, Any], device: str = "cpu") -> Any:
    """The DiT of an export as one session-like object (several bucket graphs -> BucketedSession), on
    `device` (`engines.runtime.providers`)."""
    from engines.runtime.providers import session

    config = entry.get("ort_session_config") or {}
    int8 = entry.get("precision", "fp32") not in ("fp32", "fp16")  # Q/DQ graphs: TensorRT EP may build INT8
    if entry.get("buckets"):
        return BucketedSession([session(Path(export_dir) / b["file"], config, device, int8)
                                for b in entry["buckets"]], entry["bucket_edges"])
    return session(Path(export_dir) / entry["file"], config, device, int8)


def session_providers(sess: Any) -> list[str]:
    """The execution providers a session (or the first graph of a BucketedSession) runs with."""
    return list(getattr(sess, "sessions", [sess])[0].get_providers())


class OrtBackend:
    """All graphs of an export directory in ONNX Runtime sessions on `device` (`engines.runtime.providers`);
    `providers` records, per graph, the execution providers its session runs with."""

    name = "onnxruntime"

    def __init__(self, export_dir: Path, manifest: dict[str, Any], device: str = "cpu") -> None:
        from transformers import AutoTokenizer

        from engines.runtime.providers import session

        self.manifest = manifest
        self.layout = manifest["conditioning"]
        graphs = manifest["graphs"]
        self.sessions = {name: session(Path(export_dir) / g["file"], device=device)
                         for name, g in graphs.items() if name != "dit"}
        self.sessions["dit"] = dit_session(Path(export_dir), graphs["dit"], device)
        self.providers = {name: session_providers(s) for name, s in self.sessions.items()}
        self.tokenizer = AutoTokenizer.from_pretrained(str(Path(export_dir) / "tokenizer"), local_files_only=True)
        self.dit = OrtDiT(self.sessions["dit"])

    def conditioning(self, metadata: list[dict[str, Any]]) -> dict[str, Any]:
        text_id = self.layout["text_id"]
        encoded = self.tokenizer([m[text_id] for m in metadata], truncation=True,
                                 max_length=self.layout["text_max_length"], padding="max_length", return_tensors="np")
        ids = encoded["input_ids"].astype(np.int64)
        mask = encoded["attention_mask"].astype(np.int64)
        hidden = self.sessions["text_encoder"].run(None, {"input_ids": ids, "attention_mask": mask})[0]
        out: dict[str, Any] = {text_id: [torch.from_numpy(hidden), torch.from_numpy(mask).bool()]}
        number_ids = self.layout["number_ids"]
        feeds = {i: np.asarray([float(m[i]) for m in metadata], dtype=np.float32) for i in number_ids}
        embeds = self.sessions["conditioners"].run([f"{i}_embed" for i in number_ids], feeds)
        for i, embed in zip(number_ids, embeds):
            out[i] = [torch.from_numpy(embed), torch.ones(len(metadata), 1)]
        return out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        audio = self.sessions["vae_decoder"].run(["audio"], {"latents": latents.float().numpy()})[0]
        return torch.from_numpy(audio)
