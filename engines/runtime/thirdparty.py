"""Known-harmless noise from third-party libraries, kept out of what a CLI user sees.

Each entry names exactly one message and where it is raised, and why it is harmless here; anything not
listed (a real warning) is shown as before. `quiet_known_noise()` is what the CLIs call unless `-v` is
given, so `-v` shows all of it again.

- torchsde `Should have tb<=t1` / `ta>=t0`: k-diffusion's Brownian-tree noise sampler asks for the
  interval's end points, which differ from the tree's own bounds by float rounding of the sigma schedule;
  torchsde clamps them and the noise is unchanged.
- `pkg_resources is deprecated`: clip-anytorch (imported by k-diffusion's package) imports pkg_resources;
  quadit uses neither.
- `torch.nn.utils.weight_norm is deprecated`: stable-audio-tools' Oobleck VAE builds its convolutions with
  the old weight_norm; the exported VAE graph has the weights folded, and the parity check covers it.
- `torch.cuda.amp.autocast(args...)` is deprecated / `CUDA is not available ... Disabling autocast`:
  stable-audio-tools' T5 conditioner wraps its encoder call in CUDA autocast, also on a CPU; quadit runs
  and exports the text encoder in FP32 on purpose (`exporter.models.build`), so the autocast is moot.
- `transformers X is not tested with current version of modelopt` (ModelOpt's import) and torch's
  `No CUDA runtime is found, using CUDA_HOME=...` (logged when ModelOpt's import probes for CUDA
  extensions on a CPU machine): the ModelOpt baseline uses neither transformers nor CUDA extensions.
- `No module named 'flash_attn'` / `flash_attn not installed, disabling Flash Attention`: printed (to
  stdout, where the CLIs write their JSON summary) by stable-audio-tools' transformer module at import;
  the exported graphs never use flash-attn, and PyTorch's own attention is what the reference runs.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import io
import logging
import sys
import warnings
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# (message regex, module regex of the code the warning is attributed to)
KNOWN_WARNINGS: tuple[tuple[str, str], ...] = (
    (r"Should have (tb<=t1|ta>=t0) but got", r"torchsde\._brownian\.brownian_interval"),
    (r"pkg_resources is deprecated as an API", r"clip\.clip"),
    (r"`torch\.nn\.utils\.weight_norm` is deprecated", r"torch\.nn\.utils\.weight_norm"),
    (r"`torch\.cuda\.amp\.autocast\(args\.\.\.\)` is deprecated", r"stable_audio_tools\.models\.conditioners"),
    (r"CUDA is not available or torch_xla is imported\. Disabling autocast", r"torch\.cuda\.amp\.autocast_mode"),
    (r"transformers [0-9.]+ is not tested with current version of modelopt", r"modelopt\.torch"),
)
# logger -> message prefixes of its known-harmless records
KNOWN_LOG_RECORDS: dict[str, tuple[str, ...]] = {
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}
# module -> the exact lines it prints at import
KNOWN_PRINTS: dict[str, tuple[str, ...]] = {
    "stable_audio_tools.models.transformer": ("No module named 'flash_attn'",
                                              "flash_attn not installed, disabling Flash Attention"),
}


class _CapturingLoader(importlib.abc.Loader):
    """Runs a module's import with stdout captured; its known lines go to the debug log, others through."""

    def __init__(self, inner: importlib.abc.Loader, known: tuple[str, ...]) -> None:
        self.inner, self.known = inner, known

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        buffer = io.StringIO()
        try:
            with contextlib.redirect_stdout(buffer):
                self.inner.exec_module(module)
        finally:
            for line in buffer.getvalue().splitlines():
                if line in self.known:
                    log.debug("%s (printed at import of %s)", line, module.__name__)
                else:
                    print(line)

    def __getattr__(self, name: str) -> Any:  # get_source etc. for tracebacks and inspect
        return getattr(self.inner, name)


class _KnownPrintsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in KNOWN_PRINTS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _CapturingLoader(spec.loader, KNOWN_PRINTS[fullname])
        return spec


class _KnownRecords(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_known_noise() -> None:
    """Install the filters (idempotent): warnings by message and module, log records by logger and message,
    import-time prints by module."""
    for message, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, prefixes in KNOWN_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownRecords) for f in logger.filters):
            logger.addFilter(_KnownRecords(prefixes))
    if not any(isinstance(f, _KnownPrintsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _KnownPrintsFinder())
