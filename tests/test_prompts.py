"""Coverage-driven prompt augmentation (calibration/prompts.py): seed list, taxonomy, tagging, augmentation,
coverage figures and prompt selection. Pure Python, no model, well under a second."""
from __future__ import annotations

import math

import pytest

from calibration import prompts as P

ASPECTS = {"source_category", "pitch_register", "loudness_dynamics", "rhythm_tempo", "timbre_texture",
           "acoustic_environment"}


@pytest.fixture(scope="module")
def seeds():
    return P.load_seed_prompts()


@pytest.fixture(scope="module")
def augmented(seeds):
    return P.augment(seeds, 100, seed=0)


def _conflicts(prompt: str) -> set[frozenset]:
    tags = P.tag_prompt(prompt)
    return {frozenset(tags[a] & group) for a, groups in P._EXCLUSIVE.items() for group in groups
            if len(tags[a] & group) > 1}


def test_seed_prompts(seeds):
    assert len(seeds) >= 200
    assert len({s.lower() for s in seeds}) == len(seeds)
    assert all(s == s.strip() and s for s in seeds)
    # every seed names a sound source, so augmentation never starts from an empty description
    assert sum(1 for s in seeds if P.tag_prompt(s)["source_category"]) == len(seeds)


def test_taxonomy_schema_and_modifiers():
    tax = P.load_taxonomy()
    assert set(tax) == ASPECTS
    assert len(tax["acoustic_environment"]) >= 7 and len(tax["rhythm_tempo"]) >= 6
    for aspect, values in tax.items():
        for value, spec in values.items():
            assert spec["keywords"] and all(k == k.lower() for k in spec["keywords"])
            for modifier in spec["modifiers"]:  # a modifier must raise the count of the value it is for
                assert value in P.tag_prompt(modifier, tax)[aspect], (aspect, value, modifier)
    tax.pop("timbre_texture")  # a copy: the default is untouched
    assert set(P.load_taxonomy()) == ASPECTS


def test_tag_prompt():
    t = P.tag_prompt("A dog barking in the distance, 120 BPM")
    assert t["source_category"] == {"animal"}
    assert t["acoustic_environment"] == {"distant"}
    assert t["rhythm_tempo"] == {"specific_bpm"}
    t = P.tag_prompt("Fast techno at 128bpm with a deep, distorted kick in a large reverberant hall")
    assert t["rhythm_tempo"] == {"fast", "specific_bpm"}
    assert t["pitch_register"] == {"low"} and t["timbre_texture"] == {"noisy_gritty"}
    assert t["acoustic_environment"] == {"large_hall_reverberant"}
    assert "music_instrumental" in t["source_category"]
    t = P.tag_prompt("A quiet, high-pitched whistle slowly fading away")
    assert t["loudness_dynamics"] == {"quiet", "fading"} and t["pitch_register"] == {"high"}
    assert t["rhythm_tempo"] == {"slow"}
    # hyphenated words are whole words: "mid-tempo" is a tempo, not the mid pitch register
    t = P.tag_prompt("A mid-tempo groove, 92.5 bpm")
    assert t["rhythm_tempo"] == {"moderate", "specific_bpm"} and t["pitch_register"] == set()
    assert P.tag_prompt("Bees buzzing")["source_category"] == {"animal"}  # plural of "bee"
    assert P.tag_prompt("Waves on a rocky shore")["source_category"] == {"water"}  # "rocky" is not rock music
    assert all(v == set() for v in P.tag_prompt("zzz").values())


def test_coverage_numbers():
    c = P.coverage(["a dog barking", "a cat meowing", "a car horn honking"])
    src = c["aspects"]["source_category"]
    assert src["counts"]["animal"] == 2 and src["counts"]["vehicle"] == 1 and src["counts"]["water"] == 0
    assert src["fraction"] == pytest.approx(2 / 10)
    p = [2 / 3, 1 / 3]
    assert src["entropy"] == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(10))
    assert c["aspects"]["pitch_register"] == {"fraction": 0.0, "counts": {"low": 0, "mid": 0, "high": 0,
                                                                           "sweeping": 0}, "entropy": 0.0}
    assert c["mean_fraction"] == pytest.approx(0.2 / 6) and c["num_prompts"] == 3


def test_augment_deterministic_and_unique(seeds, augmented):
    assert len(augmented) == 100
    assert len({a.lower() for a in augmented}) == 100
    assert not {a.lower() for a in augmented} & {s.lower() for s in seeds}
    assert P.augment(seeds, 100, seed=0) == augmented
    other = P.augment(seeds, 100, seed=1)
    assert other != augmented and len(other) == 100
    assert P.augment(seeds, 0) == []
    assert len(P.augment(["a dog barking"], 30, seed=3)) == 30  # works from a single base
    with pytest.raises(ValueError):
        P.augment([], 5)


def test_augment_adds_no_contradictions(seeds, augmented):
    for new in augmented:
        base = max((s for s in seeds if new.startswith(s.rstrip(" .,;") + ", ")), key=len)
        assert _conflicts(new) <= _conflicts(base), new


def test_augment_raises_coverage(seeds, augmented):
    before, after = P.coverage(seeds), P.coverage(seeds + augmented)
    assert after["mean_fraction"] > before["mean_fraction"]
    for aspect in ASPECTS:
        assert after["aspects"][aspect]["fraction"] >= before["aspects"][aspect]["fraction"]
    assert sum(after["aspects"][a]["fraction"] == 1.0 for a in ASPECTS) >= 4
    # the rare aspects also get more balanced, not just broader
    for aspect in ("loudness_dynamics", "acoustic_environment", "pitch_register"):
        assert after["aspects"][aspect]["entropy"] > before["aspects"][aspect]["entropy"] + 0.1
    report = P.coverage_report(seeds, seeds + augmented)
    assert set(report["aspects"]) == ASPECTS
    assert report["after_mean_fraction"] == pytest.approx(after["mean_fraction"])
    assert report["before_num_prompts"] == len(seeds) and report["after_num_prompts"] == len(seeds) + 100
    assert report["table"].count("\n") == 8  # header, rule, six aspects, mean


def test_select_prompts(seeds, tmp_path):
    s = P.select_prompts("seed", 20, seed=0)
    assert len(set(s)) == 20 and set(s) <= set(seeds)
    assert P.select_prompts("seed", 20, seed=0) == s != P.select_prompts("seed", 20, seed=1)
    a = P.select_prompts("augmented", 40, seed=0)
    assert len(set(a)) == 40 and P.select_prompts("augmented", 40, seed=0) == a
    assert P.coverage(a)["mean_fraction"] > P.coverage(P.select_prompts("seed", 40, seed=0))["mean_fraction"]
    f = tmp_path / "prompts.txt"
    f.write_text("rain on a tin roof\n\n  a dog barking  \nwind in the trees\n", encoding="utf-8")
    assert P.select_prompts(str(f), 2) == ["rain on a tin roof", "a dog barking"]
    with pytest.raises(ValueError, match="not found"):
        P.select_prompts(str(tmp_path / "missing.txt"), 4)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        P.select_prompts(str(tmp_path / "empty.txt"), 4)
    with pytest.raises(ValueError):
        P.select_prompts(str(f), 10)
    with pytest.raises(ValueError):
        P.select_prompts("seed", len(seeds) + 1)
