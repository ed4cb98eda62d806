"""benchmarks/transfer_map.py: a tiny map end to end (zoo, runs, rankings, JSON, table, plot),
its resumption, and the helpers it scores with (mixture weights, Spearman, the ranking's hit)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end runs (training, the CLI, processes): not in make test-fast


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("transfer_map")


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("map")
    out = root / "map.json"
    assert bench.main(["--preset", "tiny", "--root", str(root / "runs"), "--json", str(out)]) == 0
    return root, out, json.loads(out.read_text())


def test_the_tiny_map_has_every_cell_and_the_schema(bench, tiny):
    root, out, r = tiny
    p = bench.load_preset("tiny")
    for key in ("commit", "command", "machine", "sizes", "families", "methods", "cells", "ranking", "complete"):
        assert key in r, key
    assert r["complete"] is True and r["missing"] == []
    assert r["sizes"] == {"digits": [8, 16]}
    # the versions, kernels and threads its runs recorded
    assert r["environment"]["torch"] == torch.__version__ and r["environment"]["cpu_capability"]
    assert all("environment" in json.loads(f.read_text()) for f in (root / "runs").rglob("result.json"))
    methods = set(bench.methods("digits")) | set(bench.REFERENCE)
    assert set(r["methods"]) == methods and len(methods) >= 8
    cells = {(c["size"], c["method"]): c for c in r["cells"]}
    assert set(cells) == {(n, m) for n in (8, 16) for m in methods}
    for (n, m), c in cells.items():
        per_seed = [s["mse"] for s in c["per_seed"]]
        assert c["mse_mean"] == pytest.approx(np.mean(per_seed)) and c["mse_mean"] > 0
        if not c.get("reference"):
            assert [s["seed"] for s in c["per_seed"]] == p["seeds"] and c["wall_s_mean"] > 0
            assert c["target_steps"] == p["target_steps"]
            run = json.loads((bench.run_dir(root / "runs", "digits", n, c.get("picked") and f"finetune:{c['picked']}"
                                            or m, 0) / "result.json").read_text())
            assert run["mse"] == per_seed[0]
    # the reference lines do not depend on the size; auto reuses the finetune run of its pick
    assert cells[(8, "persistence")]["mse_mean"] == cells[(16, "persistence")]["mse_mean"]
    for n in (8, 16):
        auto = cells[(n, "finetune:auto")]
        assert auto["per_seed"] == cells[(n, f"finetune:{auto['picked']}")]["per_seed"]
    # mixture weights are convex and it can always fall back to one expert
    for n in (8, 16):
        for m, names in (("mix:finetuned", 3), ("mix:finetuned+extrapolation", 4)):
            for w in cells[(n, m)]["weights_per_seed"]:
                assert len(w) == names and sum(w.values()) == pytest.approx(1.0) and min(w.values()) >= 0
        # the ranked TMU trains only when the ranking picks other teachers than tmu:distill+ft-init
        ranked = cells[(n, "tmu:ranked")]
        same = ranked["teachers"] == ["digits1", "digits2"] and ranked["init_from"] == "digits2"
        assert ("note" in ranked) == same
        if same:
            assert ranked["per_seed"] == cells[(n, "tmu:distill+ft-init")]["per_seed"]
    md = out.with_suffix(".md").read_text().splitlines()
    assert sum(line.startswith("| finetune:digits2 | ") for line in md) == 1  # one row in the size table
    assert out.with_name("map_digits.png").stat().st_size > 1000


def test_ranking_quality_is_computed_from_the_runs(bench, tiny):
    _, _, r = tiny
    rk = r["ranking"]
    assert rk["cells_scored"] == 2 and 0.0 <= rk["hit_rate"] <= 1.0
    cells = {(c["size"], c["method"]): c for c in r["cells"]}
    for x in rk["cells"]:
        ft = {e: cells[(x["size"], f"finetune:{e}")]["mse_mean"] for e in bench.FAMILIES["digits"]["zoo"]}
        best = min(ft, key=ft.get)
        assert x["best_finetune"] == best and x["test_mse"] == pytest.approx(ft)
        assert x["top"] == min(x["scores"], key=x["scores"].get)
        assert x["hit"] == (x["top"] == best or ft[x["top"]] - ft[best] <= x["best_sd"])
    assert rk["hit_rate"] == pytest.approx(np.mean([x["hit"] for x in rk["cells"]]))


def test_a_rerun_redoes_nothing_and_a_lost_result_is_redone(bench, tiny, capsys):
    root, out, r = tiny
    runs = root / "runs"
    files = sorted(runs.rglob("result.json")) + sorted(runs.rglob("ranking.json"))
    per_cell = sum(k != "auto" for k, _ in bench.methods("digits").values())  # auto has no job of its own
    assert per_cell == 8 and len(files) == 3 + 2 + 2 * per_cell + 2  # zoo, baselines, runs, rankings
    before = {f: f.stat().st_mtime_ns for f in files}
    lost = bench.run_dir(runs, "digits", 16, "scratch", 0) / "result.json"
    lost.unlink()  # as if its worker had been killed before the end: claimed by a process now gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (lost.parent / ".claim").write_text(f"{gone.pid} 0")
    busy = bench.run_dir(runs, "digits", 16, "mix:finetuned", 0)  # claimed by a live worker: left alone
    (busy / "result.json").unlink()
    capsys.readouterr()
    assert bench.main(["--preset", "tiny", "--root", str(runs), "--json", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("] start ") == 1 and "start run digits size 16 scratch seed 0" in log
    after = {f: f.stat().st_mtime_ns for f in files if f.exists()}
    assert {f for f in files if f.exists() and after[f] != before[f]} == {lost}
    assert not (busy / "result.json").exists()
    r2 = json.loads(out.read_text())
    again = {(c["size"], c["method"]): c["mse_mean"] for c in r2["cells"]}
    first = {(c["size"], c["method"]): c["mse_mean"] for c in r["cells"]}
    assert r2["complete"] is False and r2["missing"] == ["digits size 16 mix:finetuned seed 0"]
    assert again.keys() == first.keys() - {(16, "mix:finetuned")}
    assert all(again[k] == first[k] for k in again if k != (16, "scratch"))
    assert again[(16, "scratch")] == pytest.approx(first[(16, "scratch")], rel=1e-5)  # same seed: same run


def test_simplex_weights_recover_a_known_blend_and_spearman(bench):
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(6, 3, 1, 4, 4, generator=g) for _ in range(3))
    truth = 0.3 * a + 0.7 * b
    assert bench.simplex_weights([a, b, c], truth, None) == pytest.approx([0.3, 0.7, 0.0])
    valid = torch.zeros_like(truth, dtype=torch.bool)
    valid[:, :, :, :2] = True  # only these pixels count: the blend there is pure c
    truth2 = torch.where(valid, c, a)
    assert bench.simplex_weights([a, b, c], truth2, valid) == pytest.approx([0.0, 0.0, 1.0])
    assert bench.spearman([1.0, 2.0, 3.0], [10.0, 30.0, 20.0]) == pytest.approx(0.5)
    assert bench.spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert bench.spearman([1.0], [2.0]) is None


def test_a_map_run_trains_to_convergence_when_the_preset_asks(bench, tiny, load_benchmark):
    """With ``max_doublings`` in the preset a learned run is resumed with its cap doubled until the
    cap is at least 1.25 x its best validation step, and records best_step and step_cap."""
    root, _, _ = tiny
    p = dict(bench.load_preset("tiny"), target_steps=2, val_every=1, max_doublings=2)
    exp = bench.target_experiment(p, "digits", 8, 0)
    run = root / "converge" / "run"
    m = bench.train_run(p, exp, run, lambda e, out, resume: bench.api.run_train(e, out, resume=resume, kind="scratch"))
    caps = [h["step_cap"] for h in m["history"]]
    assert caps == [2 * 2 ** k for k in range(len(caps))] and m["step_cap"] == caps[-1] == m["train_steps"]
    for h in m["history"][:-1]:  # every cap but the last broke the rule
        assert h["step_cap"] < 1.25 * h["best_step"]
    assert m["converged"] == (m["step_cap"] >= 1.25 * m["best_step"]) and (m["converged"] or m["doublings"] == 2)
    assert m["best_step"] == load_benchmark("convergence").best_step(run)
    once = bench.train_run(bench.load_preset("tiny"), bench.target_experiment(bench.load_preset("tiny"), "digits", 8, 0),
                           root / "converge" / "once",
                           lambda e, out, resume: bench.api.run_train(e, out, resume=resume, kind="scratch"))
    assert "best_step" not in once and once["train_steps"] == bench.load_preset("tiny")["target_steps"]


def test_extend_sets_aside_an_unconverged_run_and_its_mixtures_and_the_run_goes_on(bench, tiny, load_benchmark):
    """After max_doublings was raised, ``--extend`` sets aside a run that stopped short of the rule
    (and drops the mixtures of its cell and seed, which read its model); the run then goes on from
    its last checkpoint with the cap doubled and keeps its history."""
    root, _, _ = tiny
    conv = load_benchmark("convergence")
    p = dict(bench.load_preset("tiny"), target_steps=4, val_every=1, max_doublings=0)
    runs = root / "extend"
    d = bench.run_dir(runs, "digits", 8, "scratch", 0)

    def train(e, out, resume):
        return bench.api.run_train(e, out, resume=resume, kind="scratch")
    r0 = bench.train_run(p, bench.target_experiment(p, "digits", 8, 0), d / "run", train)
    (d / "result.json").write_text(json.dumps({**r0, "converged": False, "commit": "abc"}, default=str))
    mix = bench.run_dir(runs, "digits", 8, "mix:finetuned", 0)
    mix.mkdir(parents=True)
    (mix / "result.json").write_text("{}")
    assert bench.extend(p, runs) == 0 and (d / "result.json").is_file()  # no doubling left: kept
    p1 = dict(p, max_doublings=1)
    assert bench.extend(p1, runs) == 1
    assert (d / conv.EXTENDED).is_file() and not (d / "result.json").exists() and not (mix / "result.json").exists()
    r = bench.train_run(p1, bench.target_experiment(p1, "digits", 8, 0), d / "run", train)
    assert r["history"][0] == r0["history"][0] and [h["step_cap"] for h in r["history"]] == [4, 8]
    assert r["extended_from"] == {"step_cap": 4, "commit": "abc"} and not (d / conv.EXTENDED).exists()
    assert r["best_step"] == conv.best_step(d / "run") and r["doublings"] == 1 and r["train_steps"] == 8


def test_the_curriculum_does_not_stretch_with_the_cap(bench):
    """Scheduled sampling ends at the same step whatever cap a run is resumed to."""
    p = {"sampling_stop_steps": 150}
    for cap in (800, 1600, 25600):
        assert bench.sampling_stop(p, cap) * cap == pytest.approx(150)
        exp = bench.target_experiment(dict(bench.load_preset("tiny"), **p), "digits", 8, 0, steps=cap)
        assert exp.train.sampling_stop * exp.train.steps == pytest.approx(150)
    assert bench.sampling_stop(p, 100) == 1.0 and bench.sampling_stop({}, 800) == 0.5


def test_the_radar_references_are_the_nowcasts_a_radar_user_runs(bench):
    """Every reference line is a registered baseline that reads no more frames than the radar
    target gives it, and S-PROG, ANVIL and the STEPS mean are among them."""
    from transmem.baselines import get_method
    t_in = bench.load_preset("full")["families"]["radar"]["t_in"]
    names = [m.partition(":")[0] for m in bench.references("radar")]
    assert {"persistence", "extrapolation", "sprog", "anvil", "steps_mean"} <= set(names)
    assert all(get_method(n).inputs <= t_in for n in names)
    assert bench.references("digits") == bench.REFERENCE


def test_the_radar_target_declares_its_grid_spacing(bench):
    """STEPS' perturbations are physical: the joined MeteoSwiss parts at 32x32 are ~20 km pixels
    (the reader's 640 km square), not the 1 km assumed where nothing is declared."""
    from transmem.data.registry import pixel_km
    p = bench.load_preset("full")
    exp = bench.target_experiment(p, "radar", p["families"]["radar"]["sizes"][0], 0)
    assert exp.data.name == "transfer_map_parts" and pixel_km(exp.data) == pytest.approx(640 / 32)


def test_longer_resumes_an_early_stop_to_the_fixed_cap_and_leaves_the_map_alone(bench, tiny, load_benchmark, tmp_path):
    """benchmarks/transfer_map_longer.py picks the runs that stopped at the first cap, resumes a
    copy of each from its last checkpoint to the fixed cap, and swaps it into the cell's mean."""
    conv, longer = load_benchmark("convergence"), load_benchmark("transfer_map_longer")
    p = dict(bench.load_preset("tiny"), target_steps=2, val_every=1, max_doublings=0)
    mine, side = tmp_path / "map", tmp_path / "longer"
    d = bench.run_dir(mine, "digits", 8, "scratch", 0)
    r0 = bench.train_run(p, bench.target_experiment(p, "digits", 8, 0), d / "run", bench.trainer(mine, "digits", "scratch"))
    (d / "result.json").write_text(json.dumps({**r0, "commit": "abc"}, default=str))
    kept = {f: f.stat().st_mtime_ns for f in (d / "run").rglob("*") if f.is_file()}
    assert longer.early_stops(p, mine, "digits", 8) == [("scratch", 0)]
    assert longer.early_stops(dict(p, target_steps=4), mine, "digits", 8) == []
    r = longer.go_on((p, mine, side, "digits", 8, "scratch", 0, 6))
    run = bench.run_dir(side, "digits", 8, "scratch", 0) / "run"
    assert r["step_cap"] == 6 and r["best_step"] == conv.best_step(run) and r["map"]["step_cap"] == 2
    assert r["map"]["mse"] == r0["mse"] and r["converged"] == (6 >= 1.25 * r["best_step"])
    steps = [int(row.split(",")[1]) for row in (run / "logs" / "metrics.csv").read_text().splitlines()[1:]]
    assert max(steps) >= 5  # it trained on past the first cap, from the copied checkpoint
    assert {f: f.stat().st_mtime_ns for f in (d / "run").rglob("*") if f.is_file()} == kept  # the map's run untouched
    cell = longer.cells_with(p, mine, "digits", 8, [r])["scratch"]
    assert cell["map"] == pytest.approx(r0["mse"]) and cell["longer"] == pytest.approx(r["mse"])
    log = (run / "logs" / "metrics.csv").stat().st_mtime_ns
    assert longer.go_on((p, mine, side, "digits", 8, "scratch", 0, 6))["mse"] == r["mse"]
    assert (run / "logs" / "metrics.csv").stat().st_mtime_ns == log  # a finished run is kept, not redone


def test_longer_refits_the_mixtures_of_a_seed_whose_member_ran_longer(bench, tiny, load_benchmark, tmp_path,
                                                                      monkeypatch):
    """A mixture's seed with a member that ran longer is refit with that run in place, after the
    refit on the map's members reproduced the map's result (else nothing is written)."""
    root, _, _ = tiny
    longer = load_benchmark("transfer_map_longer")
    p = bench.load_preset("tiny")
    mixtures = {m: s for m, (kind, s) in bench.methods("digits", p).items() if kind == "mixture"}
    member = f"finetune:{next(iter(mixtures.values()))['experts'][0]}"
    first = json.loads((bench.run_dir(root / "runs", "digits", 8, member, 0) / "result.json").read_text())
    cap = first.get("step_cap") or first["train_steps"]
    run = longer.go_on((p, root / "runs", tmp_path, "digits", 8, member, 0, 2 * cap))
    refits = longer.refit_mixtures(p, root / "runs", tmp_path, "digits", 8, [run])
    assert {x["method"] for x in refits} == {m for m, s in mixtures.items() if member[len("finetune:"):] in s["experts"]}
    cells = longer.cells_with(p, root / "runs", "digits", 8, [run] + refits)
    for x in refits:
        assert x["seed"] == 0 and x["longer_members"] == [member]
        assert x["map"]["reproduced"] == pytest.approx(x["map"]["mse"], rel=1e-5)
        assert sum(x["weights"].values()) == pytest.approx(1.0)
        assert cells[x["method"]]["per_seed_longer"] == [x["mse"]]
        assert cells[x["method"]]["map"] == pytest.approx(x["map"]["mse"])
    monkeypatch.setattr(longer.tm, "fit_mixture", lambda experts, val: [0.123, 0.877] + [0.0] * (len(experts) - 2))
    with pytest.raises(SystemExit) as e:  # a fit that is not the map's: refused
        longer.refit_mixtures(p, root / "runs", tmp_path, "digits", 8, [run])
    assert "not the map's fit" in str(e.value.code)


def test_the_average_check_rescores_the_stored_mixtures_and_scores_the_plain_average(bench, tiny, load_benchmark,
                                                                                       tmp_path):
    """benchmarks/transfer_map_average.py: the stored weights reproduce each mixture run's MSE
    (it refuses otherwise), and the average is the members' mean, scored the same way."""
    import torch
    root, _, r = tiny
    avg = load_benchmark("transfer_map_average")
    out = tmp_path / "average.json"
    assert avg.main(["--preset", "tiny", "--root", str(root / "runs"), "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    p = bench.load_preset("tiny")
    mixtures = [m for m, (kind, _) in bench.methods("digits", p).items() if kind == "mixture"]
    every = {(n, m) for n in p["families"]["digits"]["sizes"] for m in mixtures}
    absent = {(n, m) for n, m in every if not (bench.run_dir(root / "runs", "digits", n, m, 0) / "result.json").is_file()}
    assert {(c["size"], c["method"]) for c in res["cells"]} == every - absent and len(every - absent) >= 2
    assert set(res["missing"]) == {f"digits size {n} {m} seed 0" for n, m in absent}
    stored = {(c["size"], c["method"]): c["mse_mean"] for c in r["cells"] if c["method"] in mixtures}
    for c in res["cells"]:
        assert c["fitted_mse"] == pytest.approx(stored[c["size"], c["method"]], rel=1e-4)
        assert c["diff_pct"] == pytest.approx(100 * (c["average_mse"] / c["fitted_mse"] - 1))
    assert res["overall"]["cells"] == len(res["cells"])
    assert res["overall"]["average_ahead"] == sum(c["diff_pct"] < 0 for c in res["cells"])
    a, b, truth = torch.rand(3, 2, 3, 1, 8, 8).unbind(0)
    assert avg.mse([a, b], [0.5, 0.5], truth, None) == pytest.approx(
        float(((a + b) / 2 - truth).pow(2).flatten(2).sum(-1).mean()), rel=1e-5)


def test_the_verdict_pairs_a_method_with_the_best_finetune_seed_by_seed(bench, tiny):
    cell = {"per_seed": [{"seed": 2, "mse": 9.0}, {"seed": 0, "mse": 10.0}, {"seed": 1, "mse": 11.0}]}
    bar = {"per_seed": [{"seed": 0, "mse": 11.0}, {"seed": 1, "mse": 12.5}, {"seed": 2, "mse": 9.5}]}
    r = bench.paired_by_seed(cell, bar)  # differences -1, -1.5, -0.5 whatever the order of the lists
    assert r["seeds"] == 3 and r["seeds_lower"] == 3 and r["t"] == pytest.approx(-1.0 / (0.5 / 3 ** 0.5))
    assert r["p"] is None or r["p"] == pytest.approx(0.0742, abs=1e-3)  # t = -3.46 on 2 degrees of freedom
    one = bench.paired_by_seed({"per_seed": [{"seed": 0, "mse": 1.0}]}, bar)  # one seed: no test
    assert one == {"seeds": 1, "seeds_lower": 1, "t": None, "p": None}
    _, _, r = tiny
    rows = [row for row in r["verdict"] if "mix:finetuned" in row]
    assert rows and all(row["mix:finetuned"]["vs_best_finetune_paired"]["seeds"] == 1 for row in rows)
