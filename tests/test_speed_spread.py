"""benchmarks/speed_spread.py: aggregation of finished runs (min / median / max, runs where a
target is met), on fabricated speed.py results -- nothing is timed."""
import json


def fake_run(path, ratio, fraction, ratio_big=None):
    summary = {"2x32": {"tmu_cached_over_backbone": ratio, "backbone_fraction_of_peak": fraction}}
    if ratio_big is not None:
        summary["4x64"] = {"tmu_cached_over_backbone": ratio_big}
    parts = {p: {"_at": "2026-01-01 00:00:00", "load_avg_before": [1.0, 1.0, 1.0]}
             for p in ("peak", "table/2x32")}
    path.write_text(json.dumps({"parts": parts, "machine": {"commit": "abc", "threads": 2},
                                "summary": summary}))


def test_finished_runs_are_read_not_rerun_and_summarised(tmp_path, capsys, load_benchmark):
    spread = load_benchmark("speed_spread")
    runs = tmp_path / "runs"
    runs.mkdir()
    fake_run(runs / "run1.json", 1.12, 0.78, 1.04)
    fake_run(runs / "run2.json", 1.08, 0.81, 1.02)
    fake_run(runs / "run3.json", 1.095, 0.74)
    # every part of every run is present: no speed.py subprocess may start (it would time for
    # minutes); the summary must come from the files alone
    assert spread.main(["--runs", "3", "--parts", "peak", "table/2x32", "--dir", str(runs)]) == 0
    out = json.loads((tmp_path / "runs.json").read_text())
    s = out["spread"]["2x32"]["tmu_cached_over_backbone"]
    assert s["values"] == [1.12, 1.08, 1.095]
    assert (s["min"], s["median"], s["max"]) == (1.08, 1.095, 1.12)
    assert s["met"] == "2/3"  # <= 1.10
    assert out["spread"]["2x32"]["backbone_fraction_of_peak"]["met"] == "1/3"  # >= 0.80
    # a key only some runs have is summarised over those runs
    assert out["spread"]["4x64"]["tmu_cached_over_backbone"]["values"] == [1.04, 1.02]
    assert [r["commit"] for r in out["runs"]] == ["abc"] * 3
    assert "| 2x32 | tmu_cached_over_backbone | <= 1.1 | 1.08 | 1.095 | 1.12 | 2/3 |" in capsys.readouterr().out


def test_met_compares_in_the_targets_direction(load_benchmark):
    spread = load_benchmark("speed_spread")
    assert spread.met(1.10, ("<=", 1.10)) and not spread.met(1.1001, ("<=", 1.10))
    assert spread.met(0.80, (">=", 0.80)) and not spread.met(0.79, (">=", 0.80))
