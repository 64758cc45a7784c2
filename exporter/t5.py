"""Where the T5 text encoder comes from, without touching the network.

stable-audio-tools' `T5Conditioner` calls `AutoTokenizer.from_pretrained(name)` and
`T5EncoderModel.from_pretrained(name)` in its constructor, which would download. `t5_source` redirects
those two calls for the duration of model construction: to a local directory or the Hugging Face cache
(`local_files_only=True`), or to a seeded, randomly initialised T5 of the named architecture with
ByT5's byte tokenizer, which needs no files. The conditioner class itself is used unchanged.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from unittest import mock

from exporter.errors import InputError

log = logging.getLogger(__name__)

# Architecture of the published T5 encoders by the names stable-audio-tools accepts.
T5_ARCH = {
    "t5-small": dict(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64),
    "t5-base": dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64),
    "t5-large": dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16, d_kv=64),
}
BYTE_VOCAB = 384  # ByT5Tokenizer: 3 specials + 256 bytes + 125 extra ids


@dataclass(frozen=True)
class T5Source:
    """`kind` is 'synthetic' (seeded random weights, byte tokenizer), 'dir' (a local directory) or
    'hf-cache' (the name looked up in the Hugging Face cache, offline)."""

    kind: str
    path: str | None = None
    seed: int = 0
    overrides: tuple[tuple[str, int], ...] = ()

    def describe(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.seed} (byte tokenizer)"
        return f"{self.kind}:{self.path}" if self.path else self.kind


def _synthetic(name: str, source: T5Source):
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    arch = dict(T5_ARCH.get(name, T5_ARCH["t5-base"]))
    arch.update(dict(source.overrides))
    config = T5Config(vocab_size=BYTE_VOCAB, is_encoder_decoder=False, use_cache=False, **arch)
    fork = torch.random.fork_rng()
    with fork:
        torch.manual_seed(source.seed)
        model = T5EncoderModel(config)
    return ByT5Tokenizer(), model


@contextlib.contextmanager
def t5_source(source: T5Source) -> Iterator[None]:
    """Redirect transformers' `from_pretrained` for T5 during model construction."""
    from transformers import AutoTokenizer, T5EncoderModel

    made: dict[str, object] = {}

    def tokenizer(name, *args, **kwargs):
        if source.kind == "synthetic":
            made["tok"], made["model"] = _synthetic(name, source)
            return made["tok"]
        where = source.path if source.kind == "dir" else name
        try:
            return _real_tok(where, local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
            raise InputError(_missing(name, source, exc)) from None

    def encoder(name, *args, **kwargs):
        if source.kind == "synthetic":
            return made.pop("model") if "model" in made else _synthetic(name, source)[1]
        where = source.path if source.kind == "dir" else name
        try:
            return _real_enc(where, local_files_only=True)
        except Exception as exc:
            raise InputError(_missing(name, source, exc)) from None

    _real_tok, _real_enc = AutoTokenizer.from_pretrained, T5EncoderModel.from_pretrained
    with mock.patch.object(AutoTokenizer, "from_pretrained", side_effect=tokenizer), \
            mock.patch.object(T5EncoderModel, "from_pretrained", side_effect=encoder):
        yield


def _missing(name: str, source: T5Source, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"directory {source.path}" if source.kind == "dir" else "the Hugging Face cache (offline)"
    return (f"T5 text encoder '{name}' not found in {where}: {first} -- pass --t5 DIR (a saved "
            f"T5EncoderModel + tokenizer) or use --synthetic-weights")


def resolve_t5_source(t5_dir: str | None, synthetic: bool, seed: int, overrides: dict[str, int] | None = None
                      ) -> T5Source:
    if synthetic:
        return T5Source("synthetic", seed=seed, overrides=tuple(sorted((overrides or {}).items())))
    if t5_dir:
        if not Path(t5_dir).is_dir():
            raise InputError(f"--t5 {t5_dir} is not a directory")
        return T5Source("dir", path=str(Path(t5_dir).resolve()))
    return T5Source("hf-cache")
