"""The `environment` block every metrics.json and benchmark result JSON records (versions, CPU
capability, threads), and the comparison `make reproduce` makes with the README's table."""
import json
import math
import platform

import pytest
import torch

from transmem import api, zoo
from transmem.demo import QUICK, demo_experiment
from transmem.environment import differences, environment, package_version

KEYS = {"torch", "lightning", "numpy", "pillow", "pysteps", "opencv", "python", "cpu_capability",
        "platform", "machine", "threads"}


def test_environment_names_versions_kernels_and_threads():
    import numpy
    import lightning
    e = environment()
    assert KEYS <= set(e)
    assert e["torch"] == torch.__version__ and e["numpy"] == numpy.__version__
    assert e["lightning"] == lightning.__version__
    assert e["python"] == platform.python_version() and e["machine"] == platform.machine()
    assert e["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert e["threads"] == torch.get_num_threads()
    json.dumps(e)  # it goes into JSON files as it is


def test_threads_are_read_when_asked_and_absent_packages_are_none():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert environment()["threads"] == 1
    finally:
        torch.set_num_threads(n)
    assert package_version("no-such-distribution-transmem") is None
    assert package_version("no-such-distribution-transmem", "torch") == torch.__version__
    assert differences({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == {"b": (2, 3), "c": (None, 4)}


def test_metrics_json_records_the_environment_and_returned_metrics_stay_scores(tmp_path):
    exp = demo_experiment(dict(QUICK, test_clips=8), 1, 1, 8)
    exp.train.progress = False
    m = api.run_evaluate(api.load_baseline("persistence", exp), exp, tmp_path / "ev")
    assert "environment" not in m and m["mse"] > 0
    written = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert written["environment"] == environment() and written["mse"] == m["mse"]
    # a finished run read back (resume) has the same shape as a fresh run's metrics
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / zoo.CARD).write_text("{}")
    (run / "metrics.json").write_text((tmp_path / "ev" / "metrics.json").read_text())
    assert api.finished_run(run) == m


def test_benchmark_writers_record_the_environment_of_their_runs(tmp_path, load_benchmark):
    claims = load_benchmark("claims")
    row = json.loads(claims.write_run(tmp_path / "r1.json", {"mse": 1.0}).read_text())
    assert row["mse"] == 1.0 and row["environment"] == environment()
    assert not list(tmp_path.glob("*.tmp"))
    one = dict(environment(), threads=1)
    out = json.loads(claims.write_json(tmp_path / "a.json", {"x": 1}, runs=[{"environment": one}] * 2).read_text())
    assert out["x"] == 1 and out["environment"] == one  # the runs' own, not this process's
    two = dict(one, numpy="0.0")
    out = json.loads(claims.write_json(tmp_path / "b.json", {}, runs=[{"environment": one}, {"environment": two}]).read_text())
    assert out["environment"] == [one, two]
    out = json.loads(claims.write_json(tmp_path / "c.json", {}, runs=[{"mse": 1}, None]).read_text())
    assert out["environment"] == environment()


def _demo(methods):
    return {"methods": {m: {"mse": v[0], "mae": v[1], "ssim": v[2], "psnr": v[3]} for m, v in methods.items()}}


REF = {"scratch": (40.0, 70.0, 0.600, 14.0), "finetune:digits2": (38.0, 69.0, 0.620, 14.5),
       "persistence": (70.0, 100.0, 0.500, 12.0)}


def test_comparison_flags_rows_beyond_the_tolerance_and_missing_rows(load_benchmark):
    r = load_benchmark("reproduce")
    ref = r.scores(_demo(REF)["methods"])
    near = r.scores(_demo(dict(REF, scratch=(40.3, 70.0, 0.600, 14.0)))["methods"])  # +0.75 % MSE
    d = r.relative_differences(ref, near)
    assert d["scratch"]["mse"] == pytest.approx(0.0075) and d["persistence"]["mse"] == 0.0
    assert r.outside(ref, near, 0.01) == []
    lines = r.outside(ref, near, 0.005)
    assert len(lines) == 1 and lines[0].startswith("scratch: mse 40.30 vs 40.00 (0.75 %)")
    missing = {k: v for k, v in near.items() if k != "finetune:digits2"}
    assert r.outside(ref, missing, 1.0) == ["finetune:digits2: missing from the rerun"]
    assert math.isinf(r.largest(r.relative_differences(ref, missing)))
    # a baseline that is not installed has no scores: its row is missing, not a crash
    assert "persistence" not in r.scores({"persistence": {"note": "not installed"}})


def test_reproduce_exit_codes(tmp_path, monkeypatch, capsys, load_benchmark):
    r = load_benchmark("reproduce")
    (tmp_path / "readme.json").write_text(json.dumps({"commit": "abc", **_demo(REF)}))
    (tmp_path / "measured.json").write_text(json.dumps({"tolerance": 0.01}))
    monkeypatch.setattr(r, "README_JSON", tmp_path / "readme.json")
    monkeypatch.setattr(r, "MEASURED_JSON", tmp_path / "measured.json")
    monkeypatch.setattr(r, "REPO", tmp_path)
    (tmp_path / "same.json").write_text(json.dumps(_demo(REF)))
    (tmp_path / "far.json").write_text(json.dumps(_demo(dict(REF, scratch=(41.0, 70.0, 0.600, 14.0)))))
    assert r.main(["--metrics", str(tmp_path / "same.json")]) == 0
    assert r.main(["--metrics", str(tmp_path / "far.json")]) == 1
    assert "scratch: mse 41.00 vs 40.00 (2.50 %)" in capsys.readouterr().out
    assert r.main(["--metrics", str(tmp_path / "nothing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nothing.json: not found" in err
    (tmp_path / "exists").mkdir()
    assert r.main(["--out", str(tmp_path / "exists")]) == 2  # no demo run into an existing folder


def test_readme_table_is_made_from_demo_readme_json(load_benchmark):
    r = load_benchmark("reproduce")
    readme = json.loads(r.README_JSON.read_text())
    assert r.readme_block((r.REPO / "README.md").read_text(encoding="utf-8")) == r.table(readme)
    # and the tolerance it is checked with was measured
    measured = json.loads(r.MEASURED_JSON.read_text())
    assert measured["tolerance"] >= measured["largest_measured"] > 0


def test_tolerance_rounds_the_largest_measured_difference_up(load_benchmark):
    rep = load_benchmark("reproducibility")
    assert rep.tolerance_from(0.0123) == pytest.approx(0.015)
    assert rep.tolerance_from(0.015) == pytest.approx(0.015)
    assert rep.tolerance_from(0.0) == pytest.approx(rep.STEP)
