"""Sensitivity measurement and `--auto-precision`: the sensitivity document's shape and figures, the knapsack
against exhaustive search and the budget, and the written recipe round-tripping to the same graph."""
from __future__ import annotations

import itertools
import json
import math

import pytest
from conftest import RTN, one_line_error, run_script

LAYERS = ["transformer.layers.0.self_attn.to_qkv", "transformer.layers.0.ff.ff.2"]


def _doc(deltas: list[dict[str, int]], costs: list[dict[str, float]], fp32: int = 10_000, base: int = 9_000) -> dict:
    return {"schemes": ["w8a8", "w4a8", "w4a16"], "fp32_weight_bytes": fp32, "base_weight_bytes": base,
            "layers": [{"name": f"l{i}", "group": f"g{i}", "schemes": {
                s: {"weight_bytes_delta": d[s], "step_nsr": c[s], "final_nsr": c[s]} for s in d}}
                for i, (d, c) in enumerate(zip(deltas, costs))]}


def test_the_export_is_the_best_measured_candidate_within_the_budget():
    from engines.evaluation.auto_precision import pick_measured

    rows = [{"size_ratio": 0.19, "final_latent_snr_db": 20.0},   # the knapsack's mix
            {"size_ratio": 0.28, "final_latent_snr_db": 30.0},   # uniform w8a8: over the budget
            {"size_ratio": 0.15, "final_latent_snr_db": 24.0}]   # uniform w4a16
    assert pick_measured(rows, 0.20) == 2
    assert pick_measured(rows, 0.30) == 1
    rows[2]["final_latent_snr_db"] = 20.0  # a tie keeps the mix
    assert pick_measured(rows, 0.20) == 0


def test_knapsack_matches_exhaustive_search_within_the_budget():
    import random

    from engines.evaluation.auto_precision import FLOAT, choose, predicted_size

    rng = random.Random(3)
    deltas, costs = [], []
    for _ in range(5):
        w8 = -rng.randint(800, 1500)
        w4 = int(w8 * 1.8)
        deltas.append({"w8a8": w8, "w4a8": w4 + 5, "w4a16": w4})
        costs.append({"w8a8": rng.uniform(1e-4, 1e-2), "w4a8": rng.uniform(1e-2, 1e-1), "w4a16": rng.uniform(5e-3, 5e-2)})
    doc = _doc(deltas, costs)
    names = [r["name"] for r in doc["layers"]]
    for budget in (0.40, 0.45, 0.55, 0.7, 0.95):
        choice = choose(doc, budget)
        assert choice.size_ratio <= budget + 1e-12
        assert predicted_size(doc, choice.assignment) == pytest.approx(choice.size_ratio)
        best = math.inf
        for combo in itertools.product([FLOAT, "w8a8", "w4a8", "w4a16"], repeat=len(names)):
            a = dict(zip(names, combo))
            if predicted_size(doc, a) <= budget:
                best = min(best, sum(doc["layers"][i]["schemes"][p]["step_nsr"] for i, p in enumerate(combo) if p != FLOAT))
        got = sum(doc["layers"][i]["schemes"][p]["step_nsr"] for i, p in enumerate(choice.assignment.values()) if p != FLOAT)
        assert got <= best * (1 + 1e-9) + 1e-15, (budget, got, best)
        assert choice.predicted_step_sqnr_db == pytest.approx(-10 * math.log10(got)) if got else True


def test_layers_reading_one_tensor_get_one_precision_and_a_budget_below_reach_is_refused():
    from engines.evaluation.auto_precision import choose
    from exporter.errors import InputError

    doc = _doc([{"w8a8": -700, "w4a8": -1300, "w4a16": -1310}] * 4,
               [{"w8a8": 1e-3, "w4a8": 1e-2, "w4a16": 2e-3}, {"w8a8": 1e-3, "w4a8": 1e-2, "w4a16": 9e-2},
                {"w8a8": 1e-4, "w4a8": 1e-2, "w4a16": 9e-2}, {"w8a8": 1e-4, "w4a8": 1e-2, "w4a16": 9e-2}])
    doc["layers"][1]["group"] = doc["layers"][0]["group"]
    choice = choose(doc, 0.5)
    assert choice.assignment["l0"] == choice.assignment["l1"]
    assert choice.size_ratio <= 0.5
    with pytest.raises(InputError, match="below the smallest size"):
        choose(doc, 0.3)  # 9000 - 4 * 1310 = 3760 bytes at the least


@pytest.fixture(scope="module")
def sensitivity(mini, mini_export, mini_calibration, tmp_path_factory):
    """Sensitivity of two sao-mini layers to w8a8 and w4a16 on one calibration prompt's FP32 trajectory."""
    import onnx

    from engines.evaluation.accuracy import AccuracySettings, capture
    from engines.evaluation.sensitivity import Probe, SensitivitySettings, measure_sensitivity
    from engines.runtime.backends import OrtBackend
    from engines.runtime.pipeline import Pipeline
    from exporter.onnx.graph_edit import weight_bytes
    from exporter.onnx.torch_export import ort_session
    from exporter.passes.recipe import Recipe

    out, manifest = mini_export
    fp32 = out / manifest["graphs"]["dit"]["file"]
    pipeline = Pipeline(OrtBackend(out, manifest), manifest)
    reference = ort_session(fp32)
    sampling = AccuracySettings(prompts=1, steps=8, seconds=2.0)
    settings = SensitivitySettings(prompts=1, probes_per_bucket=1, final_prompts=1)
    trajectories = capture(pipeline, reference, mini_calibration.meta["prompts"]["list"][:1], sampling)
    probe = Probe(reference, trajectories, mini_calibration.edges, settings, pipeline, sampling)
    base = Recipe(scheme="w8a8", **RTN)
    size = weight_bytes(onnx.load(str(fp32)))
    doc = measure_sensitivity(fp32, mini, mini_calibration, base, ("w8a8", "w4a16"), probe,
                              tmp_path_factory.mktemp("sens"), size, size, layers=LAYERS)
    return doc, fp32, base


@pytest.mark.slow  # the sensitivity fixture takes minutes
def test_sensitivity_document_has_a_number_per_layer_scheme_and_metric(sensitivity, tmp_path):
    from engines.evaluation.sensitivity import SCHEMA, plot_sensitivity

    doc, _, _ = sensitivity
    assert doc["schema_version"] == SCHEMA and doc["kind"] == "quadit-sensitivity"
    assert [r["name"] for r in doc["layers"]] == LAYERS
    assert doc["probe"]["steps"] == 3 and doc["probe"]["final_prompts"] == 1  # one probe per bucket, 3 buckets
    for row in doc["layers"]:
        assert set(row["schemes"]) == {"w8a8", "w4a16"}
        for figures in row["schemes"].values():
            for key in ("step_sqnr_db", "step_nsr", "final_latent_snr_db", "final_nsr"):
                assert isinstance(figures[key], float) and math.isfinite(figures[key]), (row["name"], key)
            assert 5 < figures["step_sqnr_db"] < 90 and 0 < figures["step_nsr"] < 1
            assert figures["weight_bytes_delta"] < 0
        # 4-bit weights save more bytes than 8-bit ones, and cost more noise on weights this size
        assert row["schemes"]["w4a16"]["weight_bytes_delta"] < row["schemes"]["w8a8"]["weight_bytes_delta"]
    # ff.ff.2: 2048 x 512 FP32 -> INT8, plus 512 weight scales and the smoothing Mul's 2048 factors (FP32)
    w8 = doc["layers"][1]["schemes"]["w8a8"]["weight_bytes_delta"]
    assert -2048 * 512 * 3 < w8 < -2048 * 512 * 3 + 4 * (512 + 2048) + 1024
    json.dumps(doc, allow_nan=False)
    plot_sensitivity(doc, tmp_path / "s.png", {n: "w8a8" for n in LAYERS})
    assert (tmp_path / "s.png").stat().st_size > 10_000


@pytest.mark.slow
def test_chosen_recipe_respects_the_budget_and_round_trips_to_the_same_graph(sensitivity, mini, mini_calibration):
    from engines.evaluation.auto_precision import FLOAT, assignment_recipe, choose
    from exporter.models.layers import quantizable_linears
    from exporter.onnx.graph_edit import weight_bytes
    from exporter.passes.recipe import Recipe
    from exporter.stages.quantized import quantize_graph

    doc, fp32, base = sensitivity
    full = doc["base_weight_bytes"] / doc["fp32_weight_bytes"]
    w8 = sum(r["schemes"]["w8a8"]["weight_bytes_delta"] for r in doc["layers"])
    budget = full + 0.6 * w8 / doc["fp32_weight_bytes"]  # less than every measured layer at w8a8
    choice = choose(doc, budget)
    assert choice.size_ratio <= budget
    assert "w4a16" in choice.assignment.values()
    layers = list(quantizable_linears(mini.dit))
    recipe = assignment_recipe(base, {**{n: FLOAT for n in layers}, **choice.assignment})
    again = Recipe.from_json(json.loads(json.dumps(recipe.to_json())))
    assert again == recipe and again.digest() == recipe.digest()
    resolved = again.resolve(layers)
    for name in layers:
        expected = choice.assignment.get(name, FLOAT)
        assert (resolved[name] or {"scheme": FLOAT})["scheme"] == expected, name
    model, _ = quantize_graph(fp32, layers, mini_calibration, recipe)
    model2, _ = quantize_graph(fp32, layers, mini_calibration, again)
    assert model.SerializeToString() == model2.SerializeToString()
    measured = weight_bytes(model) / doc["fp32_weight_bytes"]
    assert measured <= choice.size_ratio + 1e-9 and measured == pytest.approx(choice.size_ratio, abs=1e-4)


@pytest.mark.parametrize("flags, needle", [
    (["--size-budget", "0.2"], "--size-budget needs --auto-precision"),
    (["--auto-precision"], "needs --size-budget"),
    (["--auto-precision", "--size-budget", "1.5"], "must be in (0, 1]"),
    (["--auto-precision", "--size-budget", "0.2", "--target", "tensorrt", "--scheme", "w4a8"], "w4a8 is not supported"),
])
def test_auto_precision_arguments_exit_2_before_any_work(tmp_path, flags, needle):
    out = tmp_path / "out"
    proc = run_script("export.py", "--synthetic-weights", *flags, "--out", str(out))
    assert needle in one_line_error(proc)
    assert not out.exists()


@pytest.mark.slow
def test_auto_precision_export_writes_sensitivity_and_a_recipe_that_reproduces_it(mini_calibration, tmp_path):
    """The whole CLI path: --auto-precision exports, and --recipe recipe.auto.json exports the same DiT graph."""
    out, again = tmp_path / "auto", tmp_path / "again"
    common = ["--synthetic-weights", "--calibration", str(mini_calibration.directory), "--report-prompts", "1",
              "--report-steps", "8", "--report-seconds", "2", "--no-modelopt"]
    proc = run_script("export.py", *common, "--auto-precision", "--size-budget", "0.2", "--out", str(out), timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    doc = json.loads((out / manifest["sensitivity"]["file"]).read_text())
    assert len(doc["layers"]) == 42 and (out / "sensitivity.png").is_file()
    assert manifest["graphs"]["dit"]["size_ratio"] <= 0.2
    rows = {r["name"]: r for r in doc["auto_precision"]["verification"]["rows"]}
    assert rows["auto"]["size_ratio"] <= 0.2 < rows["uniform w8a8"]["size_ratio"]
    proc = run_script("export.py", *common, "--recipe", str(out / "recipe.auto.json"), "--out", str(again), timeout=3000)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m2 = json.loads((again / "manifest.json").read_text())
    assert m2["graphs"]["dit"]["sha256"] == manifest["graphs"]["dit"]["sha256"]
