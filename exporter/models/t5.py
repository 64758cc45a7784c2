"""Where the T5 text encoder comes from, without touching the network.

stable-audio-tools' `T5Conditioner` calls `AutoTokenizer.from_pretrained(name)` and
`T5EncoderModel.from_pretrained(name)` in its constructor, which would download. `t5_source` redirects
those two calls for the duration of model construction: to a local directory (`--t5 DIR`, a Stable Audio
snapshot's own text_encoder/ + tokenizer/, or the named T5's Hugging Face cache snapshot, read with
`local_files_only=True`), or to a seeded, randomly initialised T5 of the named architecture with
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
    """`kind` is 'synthetic' (seeded random weights, byte tokenizer) or 'dir' (a saved encoder in
    `path`, its tokenizer in `tokenizer`, which defaults to `path`: a --t5 directory, a Hugging Face
    cache snapshot, or a Stable Audio snapshot's own text_encoder/ + tokenizer/)."""

    kind: str
    path: str | None = None
    seed: int = 0
    overrides: tuple[tuple[str, int], ...] = ()
    tokenizer: str | None = None

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer or self.path

    def describe(self) -> str:
        if self.kind == "synthetic":
            return f"synthetic:{self.seed} (byte tokenizer)"
        if self.tokenizer and self.tokenizer != self.path:
            return f"{self.kind}:{self.path} (tokenizer {self.tokenizer})"
        return f"{self.kind}:{self.path}" if self.path else self.kind

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "path": self.path, "tokenizer": self.tokenizer}


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
        try:
            made["tok"] = _real_tok(source.tokenizer_path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/EnvironmentError variants
            raise InputError(_missing(name, source, exc)) from None
        return made["tok"]

    def encoder(name, *args, **kwargs):
        if source.kind == "synthetic":
            return made.pop("model") if "model" in made else _synthetic(name, source)[1]
        try:
            model = _real_enc(source.path, local_files_only=True)
        except Exception as exc:
            raise InputError(_missing(name, source, exc)) from None
        _check_vocabulary(made.get("tok"), model, source)
        return model

    _real_tok, _real_enc = AutoTokenizer.from_pretrained, T5EncoderModel.from_pretrained
    with mock.patch.object(AutoTokenizer, "from_pretrained", side_effect=tokenizer), \
            mock.patch.object(T5EncoderModel, "from_pretrained", side_effect=encoder):
        yield


def _missing(name: str, source: T5Source, exc: Exception) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"T5 text encoder '{name}' cannot be loaded from {source.describe()}: {first} -- pass --t5 DIR "
            f"(a saved T5EncoderModel + tokenizer) or use --synthetic-weights")


def _check_vocabulary(tokenizer, model, source: T5Source) -> None:
    """transformers builds a T5 tokenizer from tokenizer_config.json alone when the vocabulary file is
    absent: 100 extra ids and 3 specials, so every word becomes <unk>. Refuse a tokenizer that covers
    less than 90% of the encoder's embedding rows (T5-base: 32100 of 32128)."""
    if tokenizer is None:
        return
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab and len(tokenizer) < 0.9 * vocab:
        raise InputError(f"the tokenizer in {source.tokenizer_path} has {len(tokenizer)} tokens for a T5 with "
                         f"{vocab} embeddings: it is not this encoder's tokenizer (spiece.model or tokenizer.json "
                         "missing?)")


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
FILE_FREE_TOKENIZERS = ("ByT5Tokenizer",)  # tokenizers that need no vocabulary file


def check_t5_dir(encoder_dir: Path, tokenizer_dir: Path, what: str = "--t5") -> None:
    """Refuse, naming what is missing, a directory that lacks the encoder's config or weights or a
    usable tokenizer (before anything is built or written)."""
    import json

    missing = []
    if not (encoder_dir / "config.json").is_file():
        missing.append(f"config.json in {encoder_dir}")
    if not any((encoder_dir / f).is_file() for f in WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES[:2])}) in {encoder_dir}")
    if not any((tokenizer_dir / f).is_file() for f in TOKENIZER_FILES):
        cls = ""
        config = tokenizer_dir / "tokenizer_config.json"
        if config.is_file():
            try:
                cls = str(json.loads(config.read_text()).get("tokenizer_class", ""))
            except (ValueError, UnicodeDecodeError):
                cls = ""
        if cls not in FILE_FREE_TOKENIZERS:
            missing.append(f"tokenizer files ({' or '.join(TOKENIZER_FILES)}) in {tokenizer_dir}")
    if missing:
        raise InputError(f"{what} {encoder_dir} is not a usable T5 text encoder: missing " + "; ".join(missing))


def cache_repos(name: str) -> list[str]:
    """Hub repositories a T5 named `name` may be cached under: transformers' old alias (models--t5-base)
    and the id a download makes today (google-t5/t5-base)."""
    return [name] if "/" in name else [name, f"google-t5/{name}"]


def _from_cache(name: str, bundled: tuple[Path, Path] | None) -> T5Source:
    """The weights' own text_encoder/ + tokenizer/ (`bundled`: a Stable Audio snapshot or diffusers
    pipeline carries T5-base there), else the T5 named in the config in the Hugging Face cache."""
    from exporter.models import hf_cache

    if bundled is not None:
        encoder, tokenizer = bundled
        check_t5_dir(encoder, tokenizer, "text encoder")
        return T5Source("dir", path=str(encoder.absolute()), tokenizer=str(tokenizer.absolute()))
    repos = cache_repos(name)
    snap = hf_cache.find_snapshot(repos, ["config.json", "|".join(WEIGHT_FILES)])
    if snap is None:
        raise InputError(f"T5 text encoder '{name}' not found in the Hugging Face cache {hf_cache.cache_root()} "
                         f"(looked for {', '.join('models--' + r.replace('/', '--') for r in repos)}) -- pass --t5 "
                         "DIR (a saved T5EncoderModel + tokenizer) or use --synthetic-weights")
    check_t5_dir(snap, snap, "cached T5")
    return T5Source("dir", path=str(snap))


def resolve_t5_source(t5_dir: str | None, synthetic: bool, seed: int, overrides: dict[str, int] | None = None,
                      name: str = "t5-base", bundled: tuple[Path, Path] | None = None,
                      tokenizer_dir: str | None = None
                      ) -> T5Source:
    """Where the text encoder comes from: synthetic, --t5 DIR, or found offline (see `_from_cache`)."""
    if synthetic:
        return T5Source("synthetic", seed=seed, overrides=tuple(sorted((overrides or {}).items())))
    if t5_dir:
        path = Path(t5_dir)
        if not path.is_dir():
            raise InputError(f"--t5 {t5_dir} is not a directory")
        tok = Path(tokenizer_dir) if tokenizer_dir else path
        check_t5_dir(path, tok)
        return T5Source("dir", path=str(path.absolute()), tokenizer=str(tok.absolute()) if tokenizer_dir else None)
    return _from_cache(name, bundled)
