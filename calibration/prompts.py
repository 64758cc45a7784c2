"""Calibration prompts and coverage-driven prompt augmentation (PTQ4ADM).

Why this exists: post-training quantization takes its ranges from the activations that the calibration
prompts excite, and in a text-conditioned audio DiT the text steers those activations. A prompt list
that is mostly "a dog barking" and "lo-fi beat, 85 BPM" never shows the quantizer a loud crescendo, a
high shrill tone or a muffled underwater scene, so those conditions get clipped ranges at inference.
PTQ4ADM's remedy, implemented here, is to tag every prompt with an audio-aspect taxonomy (source,
pitch register, loudness/dynamics, rhythm/tempo, timbre, acoustic environment), measure how evenly the
prompts cover each aspect's values, and rewrite seed prompts towards the least represented values.

Everything is deterministic given a seed and offline (no network, no language model): the taxonomy's
keywords tag prompts, its modifier phrases rewrite them. Imports nothing else of quadit.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

__all__ = ["load_seed_prompts", "load_taxonomy", "tag_prompt", "coverage", "augment", "coverage_report",
           "select_prompts"]

log = logging.getLogger(__name__)

_DATA = Path(__file__).resolve().parent / "data"
# "<number> bpm" in any spacing ("120 BPM", "120bpm", "92.5 bpm"): tempo is often stated only this way.
_BPM = re.compile(r"(?<![\w.])\d{2,3}(?:\.\d+)?\s?-?\s?bpm(?![\w-])", re.IGNORECASE)
# Values of one aspect that cannot describe the same sound at once. Augmentation never adds a value that
# forms such a pair with a value the prompt already has, so it never writes "slow ... fast-paced".
_EXCLUSIVE: dict[str, list[set[str]]] = {
    "pitch_register": [{"low", "mid", "high"}],
    "loudness_dynamics": [{"quiet", "loud"}, {"crescendo", "fading"}],
    "rhythm_tempo": [{"slow", "moderate", "fast", "specific_bpm"}, {"steady_pulse", "irregular"}],
    "timbre_texture": [{"bright", "dark_warm"}, {"smooth", "noisy_gritty"}, {"smooth", "percussive"}],
    "acoustic_environment": [{"small_room", "large_hall_reverberant", "outdoors_open"}, {"distant", "close_mic"},
                             {"close_mic", "underwater_or_muffled"}],
}
_PATTERNS: dict[int, tuple[dict, dict[tuple[str, str], re.Pattern | None]]] = {}

Tags = dict[str, set[str]]


def load_seed_prompts() -> list[str]:
    """The shipped hand-written seed prompts (about 40% foley, 35% music, 25% ambience), in file order."""
    lines = (_DATA / "seed_prompts.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]


@lru_cache(maxsize=1)
def _default_taxonomy() -> dict:
    aspects = json.loads((_DATA / "taxonomy.json").read_text(encoding="utf-8"))["aspects"]
    for aspect, values in aspects.items():
        for value, spec in values.items():
            if not spec.get("keywords") or not spec.get("modifiers"):
                raise ValueError(f"taxonomy {aspect}.{value} needs non-empty 'keywords' and 'modifiers'")
    return aspects


def load_taxonomy() -> dict:
    """The `aspects` object of the shipped taxonomy: aspect -> value -> {keywords, modifiers}.

    A fresh copy each call, so a caller may edit it (e.g. drop an aspect) without touching the default.
    """
    return copy.deepcopy(_default_taxonomy())


def _patterns(taxonomy: dict) -> dict[tuple[str, str], re.Pattern | None]:
    """One compiled regex per (aspect, value), cached per taxonomy object (tagging runs thousands of times)."""
    hit = _PATTERNS.get(id(taxonomy))
    if hit is not None and hit[0] is taxonomy:
        return hit[1]
    compiled: dict[tuple[str, str], re.Pattern | None] = {}
    for aspect, values in taxonomy.items():
        for value, spec in values.items():
            words = sorted({k.strip().lower() for k in spec["keywords"] if k.strip()}, key=len, reverse=True)
            # Whole words or phrases, with a hyphen counted as part of a word ("mid" must not fire on
            # "mid-tempo"), and an optional plural so "bee" also tags "bees".
            alt = "|".join(re.escape(w) for w in words)
            compiled[(aspect, value)] = re.compile(rf"(?<![\w-])(?:{alt})(?:s|es)?(?![\w-])") if alt else None
    if len(_PATTERNS) > 16:
        _PATTERNS.clear()
    _PATTERNS[id(taxonomy)] = (taxonomy, compiled)
    return compiled


def tag_prompt(prompt: str, taxonomy: dict | None = None) -> dict[str, set[str]]:
    """Aspect -> the set of values whose keywords occur in `prompt` (every aspect present, maybe empty).

    Keyword matching is deliberately simple and transparent: the point is a reproducible coverage
    measure, not language understanding. `specific_bpm` also fires on any "<number> bpm".
    """
    tax = taxonomy if taxonomy is not None else _default_taxonomy()
    text = prompt.lower()
    tags: Tags = {aspect: set() for aspect in tax}
    for (aspect, value), pattern in _patterns(tax).items():
        if (pattern is not None and pattern.search(text)) or (value == "specific_bpm" and _BPM.search(text)):
            tags[aspect].add(value)
    return tags


def _count(tag_list: list[Tags], taxonomy: dict) -> dict[str, Counter]:
    counts = {aspect: Counter({value: 0 for value in values}) for aspect, values in taxonomy.items()}
    for tags in tag_list:
        for aspect, values in tags.items():
            counts[aspect].update(values)
    return counts


def _summarise(counts: dict[str, Counter], num_prompts: int) -> dict:
    aspects = {}
    for aspect, counter in counts.items():
        k, total = len(counter), sum(counter.values())
        h = -sum(c / total * math.log(c / total) for c in counter.values() if c) if total else 0.0
        entropy = (h / math.log(k) if k > 1 else 1.0) if total else 0.0
        aspects[aspect] = {"fraction": sum(1 for c in counter.values() if c) / k if k else 0.0,
                           "counts": dict(counter), "entropy": entropy}
    mean = sum(a["fraction"] for a in aspects.values()) / len(aspects) if aspects else 0.0
    return {"aspects": aspects, "mean_fraction": mean, "num_prompts": num_prompts}


def coverage(prompts: list[str], taxonomy: dict | None = None) -> dict:
    """How evenly `prompts` cover the taxonomy.

    Returns `{"aspects": {aspect: {"fraction", "counts", "entropy"}}, "mean_fraction", "num_prompts"}`:
    `fraction` is the share of the aspect's values hit by at least one prompt (breadth), `counts` maps
    every value to the number of prompts hitting it, and `entropy` is the Shannon entropy of that
    distribution normalised by log(#values), 0..1 (balance: 1 means every value equally often).
    """
    tax = taxonomy if taxonomy is not None else _default_taxonomy()
    return _summarise(_count([tag_prompt(p, tax) for p in prompts], tax), len(prompts))


def _conflicts(tags: Tags, aspect: str, value: str) -> bool:
    have = tags.get(aspect, set())
    return any(value in group and have & (group - {value}) for group in _EXCLUSIVE.get(aspect, ()))


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def _compose(rng: random.Random, target: tuple[str, str], bases: list[str], base_tags: list[Tags],
             counts: dict[str, Counter], tax: dict, mod_tags: dict[str, Tags]) -> str | None:
    """One rewritten prompt aimed at `target`, plus 0-2 more under-covered aspects; None if impossible."""
    aspect, value = target
    fits = [i for i, t in enumerate(base_tags) if not _conflicts(t, aspect, value)]
    if not fits:
        return None
    # Prefer a base silent on the target aspect: adding "loud" to "a quiet forest" would fight the base.
    silent = [i for i in fits if not base_tags[i][aspect]]
    i = rng.choice(silent or fits)
    tags = {a: set(v) for a, v in base_tags[i].items()}
    chosen = [target]
    others = [a for a in tax if a != aspect and not tags[a]]
    ranked = sorted(others, key=lambda a: (min(counts[a].values()), rng.random()))
    for a in ranked[: rng.randint(1, 3) - 1]:
        chosen.append((a, min(tax[a], key=lambda v, a=a: (counts[a][v], rng.random()))))
    phrases = []
    for a, v in chosen:
        # A modifier may also hit other aspects ("outdoors on a city street"); skip any that contradicts.
        mods = [m for m in tax[a][v]["modifiers"]
                if not any(_conflicts(tags, ma, mv) for ma, vs in mod_tags[m].items() for mv in vs)]
        if not mods:
            if (a, v) == target:
                return None
            continue
        m = rng.choice(mods)
        phrases.append(m)
        for ma, vs in mod_tags[m].items():
            tags[ma] |= vs
    rng.shuffle(phrases)
    return bases[i].rstrip(" .,;") + ", " + ", ".join(phrases)


def augment(prompts: list[str], num: int, seed: int = 0, taxonomy: dict | None = None) -> list[str]:
    """`num` new prompts (originals excluded) that fill the taxonomy's least represented values.

    Each step ranks every (aspect, value) by how many prompts so far (the originals plus those already
    generated) hit it, targets the rarest, picks a seeded base among the originals (preferring bases
    silent on that aspect, never one that contradicts the value), and appends modifier phrases for the
    target and up to two more aspects the base is silent on. One value per aspect per rewrite and the
    exclusivity table keep a rewrite free of contradictions; exact duplicates are rejected. Water-filling
    on counts raises breadth first (absent values go first), then balance (entropy).
    """
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    tax = taxonomy if taxonomy is not None else _default_taxonomy()
    bases = [p.strip() for p in prompts if p.strip()]
    if num and not bases:
        raise ValueError("augment needs at least one non-empty base prompt")
    rng = random.Random(seed)
    base_tags = [tag_prompt(p, tax) for p in bases]
    counts = _count(base_tags, tax)
    mod_tags = {m: tag_prompt(m, tax) for values in tax.values() for spec in values.values() for m in spec["modifiers"]}
    pairs = [(a, v) for a, values in tax.items() for v in values]
    seen = {_norm(p) for p in bases}
    out: list[str] = []
    stalls = 0
    while len(out) < num:
        order = sorted(pairs, key=lambda av: (counts[av[0]][av[1]], rng.random()))
        for target in order:
            new = _compose(rng, target, bases, base_tags, counts, tax, mod_tags)
            if new is not None and _norm(new) not in seen:
                break
        else:
            stalls += 1
            if stalls > 20:
                raise RuntimeError(f"could only make {len(out)} of {num} unique augmented prompts")
            continue
        seen.add(_norm(new))
        out.append(new)
        for a, vs in tag_prompt(new, tax).items():
            counts[a].update(vs)
    if out:
        log.info("augmented %d prompts with %d more: mean coverage %.3f -> %.3f", len(bases), len(out),
                 coverage(bases, tax)["mean_fraction"], _summarise(counts, len(bases) + len(out))["mean_fraction"])
    return out


def coverage_report(before: list[str], after: list[str]) -> dict:
    """Before/after coverage of the default taxonomy, for the closing note and the summary table.

    `after` is the whole list after augmentation (originals plus new prompts). Returns
    `{"aspects": {aspect: {before_fraction, after_fraction, before_entropy, after_entropy}},
    "before_mean_fraction", "after_mean_fraction", "before_num_prompts", "after_num_prompts", "table"}`,
    where `table` is the same figures as a Markdown table.
    """
    b, a = coverage(before), coverage(after)
    aspects = {name: {"before_fraction": b["aspects"][name]["fraction"], "after_fraction": a["aspects"][name]["fraction"],
                      "before_entropy": b["aspects"][name]["entropy"], "after_entropy": a["aspects"][name]["entropy"]}
               for name in b["aspects"]}
    rows = ["| aspect | fraction before | fraction after | entropy before | entropy after |",
            "|---|---|---|---|---|"]
    rows += [f"| {name} | {r['before_fraction']:.3f} | {r['after_fraction']:.3f} | {r['before_entropy']:.3f} | "
             f"{r['after_entropy']:.3f} |" for name, r in aspects.items()]
    rows.append(f"| mean | {b['mean_fraction']:.3f} | {a['mean_fraction']:.3f} | | |")
    return {"aspects": aspects, "before_mean_fraction": b["mean_fraction"], "after_mean_fraction": a["mean_fraction"],
            "before_num_prompts": b["num_prompts"], "after_num_prompts": a["num_prompts"], "table": "\n".join(rows)}


def _greedy_cover(pool: list[str], num: int, seed: int) -> list[str]:
    """Greedy max-coverage choice of `num` prompts with diminishing returns per (aspect, value).

    A prompt's gain is the sum over its values of 1 / (1 + times that value is already selected), so the
    first prompt for an uncovered value is worth most and later picks spread over values (balance).
    Ties break by a seeded random key, so the choice is deterministic by seed.
    """
    tax = _default_taxonomy()
    rng = random.Random(seed)
    hits = [[(a, v) for a, vs in tag_prompt(p, tax).items() for v in vs] for p in pool]
    keys = [rng.random() for _ in pool]
    selected: Counter = Counter()
    left, chosen = set(range(len(pool))), []
    for _ in range(num):
        best = max(left, key=lambda i: (sum(1.0 / (1 + selected[h]) for h in hits[i]), keys[i]))
        left.discard(best)
        chosen.append(pool[best])
        selected.update(hits[best])
    return chosen


def select_prompts(source: str, num: int, seed: int = 0) -> list[str]:
    """`num` calibration prompts from `source`, deterministic by `seed`.

    - `"seed"`: the first `num` seed prompts after a seeded shuffle (an unbiased sample of the seed list).
    - `"augmented"`: the seed prompts plus `num` augmented ones, then a greedy max-coverage choice of `num`
      (see `_greedy_cover`); a fixed seed/augmented split would waste slots on prompts that add nothing,
      the greedy choice spends every slot on the rarest values still missing.
    - otherwise a path to a UTF-8 text file with one prompt per line (blank lines ignored), used in file
      order: a curated list is taken as given.
    Raises `ValueError` when the file is missing or empty, or has fewer than `num` prompts.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if source == "seed":
        pool = load_seed_prompts()
        if num > len(pool):
            raise ValueError(f"the seed list has {len(pool)} prompts, fewer than the {num} asked for")
        return random.Random(seed).sample(pool, num)
    if source == "augmented":
        seeds = load_seed_prompts()
        return _greedy_cover(seeds + augment(seeds, num, seed=seed), num, seed)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"prompt file not found: {source} (expected 'seed', 'augmented' or a text file)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file is empty: {source}")
    if num > len(prompts):
        raise ValueError(f"prompt file {source} has {len(prompts)} prompts, fewer than the {num} asked for")
    return prompts[:num]
