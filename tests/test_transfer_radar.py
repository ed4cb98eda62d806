"""benchmarks/transfer_radar.py: leave one radar network out, end to end at toy scale (two
networks, the ~1 hour budget, one seed), the JSON's keys and the convergence rule's fields; the
budgets each network gets; a run whose best step is at its cap resumed with the cap doubled."""
import json

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("transfer_radar")


@pytest.fixture(scope="module")
def tiny(bench, tmp_path_factory, shared_data):
    if not (shared_data / "radar" / "mch").is_dir() or not (shared_data / "radar" / "fmi").is_dir():
        pytest.skip(f"{shared_data}/radar: the MeteoSwiss and FMI events are absent")
    root = tmp_path_factory.mktemp("radar")
    mp = pytest.MonkeyPatch()
    mp.delenv("TRANSMEM_RADAR_CACHE", raising=False)  # the cache goes beside the runs, in tmp
    mp.setattr(bench, "SHARED", shared_data)
    out = root / "radar.json"
    try:
        assert bench.main(["--preset", "tiny", "--root", str(root / "runs"), "--json", str(out)]) == 0
    finally:
        mp.undo()
    return root, out, json.loads(out.read_text())


def test_the_budgets_each_network_gets(bench, tmp_path):
    p = bench.load_preset("full")
    assert {n: bench.budgets_of(p, n) for n in p["networks"]} == {
        "mch": ["1h", "3h", "all"], "fmi": ["1h", "all"], "opera": ["1h", "all"], "mrms": ["all"]}
    assert {n: bench.verdict_budget(p, n) for n in p["networks"]} == {"mch": "1h", "fmi": "1h", "opera": "1h",
                                                                      "mrms": "all"}
    # ~1 hour is 12 frames at 5 minutes; opera's 1 h (4 frames) is raised to one clip (6 frames)
    assert bench.budget_frames(p, "mch", "1h") == 12 and bench.budget_frames(p, "opera", "1h") == 6
    assert bench.budget_frames(p, "mch", "all") == 68 and bench.budget_frames(p, "fmi", "3h") is None
    # a budget is the first frames in time; no frame is in two splits; every network is at 8 km
    assert bench.train_windows(p, "mch", "3h") == [("20150515", 0, 36)]
    for n, s in bench.NETWORKS.items():
        frames = [(ev, f) for k in ("train", "val", "test") for ev, a, b in s[k] for f in range(a, b)]
        assert len(frames) == len(set(frames)), n
        assert bench.pixel_km(p, n) == 8.0
        # a network's zoo entry never trains on the validation windows that pick its step
        parts = bench.network_data(p, n, tmp_path)["extra"]["parts"]

        def frames_of(split):
            return {(str(x["extra"]["source"].get("extra", {}).get("events")), f)
                    for x in parts[split] for f in range(*x["extra"]["window"])}
        assert frames_of("val") and frames_of("train").isdisjoint(frames_of("val")), n
        assert frames_of("test") <= frames_of("train"), n


def test_the_tiny_run_has_every_cell_and_the_schema(bench, tiny):
    root, out, r = tiny
    p = bench.load_preset("tiny")
    for key in ("commit", "command", "machine", "networks", "budgets", "methods", "cells", "verdict"):
        assert key in r, key
    assert r["complete"] is True and r["missing"] == []
    assert set(r["networks"]) == {"mch", "fmi"}
    learned = bench.TRAINED + (bench.MIX,)
    for t in ("mch", "fmi"):
        cells = {(c["budget"], c["method"]): c for c in r["cells"] if c["target"] == t}
        assert {("1h", m) for m in learned} | {("0", bench.ZERO_SHOT), ("0", "best_baseline")} <= set(cells)
        # the target's own model is never in its zoo
        assert t not in [row["name"] for row in r["rankings"][f"{t}/1h"]["rows"]]
        assert cells[("0", bench.ZERO_SHOT)]["entry"] != t
    for c in r["cells"]:
        for key in ("target", "budget", "method", "per_seed", "mse_mean", "mse_std", "csi_1_mean", "best_step",
                    "step_cap"):
            assert key in c, (key, c["method"])
        assert c["mse_mean"] > 0
        if c.get("reference"):
            continue
        # the convergence rule's fields, per seed and per cell
        assert [s["seed"] for s in c["per_seed"]] == p["seeds"]
        for s in c["per_seed"]:
            assert 0 < s["best_step"] <= s["step_cap"] and s["step_cap"] >= p["target_steps"]
            assert s["converged"] == (s["step_cap"] >= 1.25 * s["best_step"])
        assert c["best_step"] == max(s["best_step"] for s in c["per_seed"])
        assert c["step_cap"] == min(s["step_cap"] for s in c["per_seed"])
        assert c["converged"] or f"{c['target']} {c['budget']} {c['method']}" in r["convergence"]["unconverged"] \
            or c["method"] == bench.MIX
    # every network's zoo entry is trained by the same rule, on its validation windows, and saved
    # under its network's name
    for n in ("advected_rain", "mch", "fmi"):
        z = r["zoo"][n]
        first = p["pretext_steps" if n == "advected_rain" else "network_steps"]
        assert 0 < z["best_step"] <= z["step_cap"] and z["step_cap"] >= first, z
        assert z["converged"] == (z["step_cap"] >= 1.25 * z["best_step"])
        assert r["convergence"]["zoo"][n]["step_cap"] == z["step_cap"]
        assert json.loads((root / "runs" / "zoo" / n / "card.json").read_text())["name"] == n
    for t, v in r["verdict"]["per_target"].items():
        assert v["complete"] and v["best_transfer"] in bench.TRANSFER
        assert v["beats_all"] == (v["beats_scratch"] and v["beats_zero_shot"] and v["beats_best_baseline"])
    assert r["verdict"]["targets_won"] == sum(v["beats_all"] for v in r["verdict"]["per_target"].values())
    # the mixtures hold the zero-shot forecast's entry as it is; the product's, every baseline that scores
    for t in ("mch", "fmi"):
        zero_shot = next(c["entry"] for c in r["cells"] if c["target"] == t and c["method"] == bench.ZERO_SHOT)
        mix = json.loads((bench.job_dir(root / "runs", "mix", t, "1h", bench.MIX, 0) / "result.json").read_text())
        assert zero_shot in mix["weights"] and len(mix["weights"]) == 2 + p["mix_members"]
        mixp = json.loads((bench.job_dir(root / "runs", "mixp", t, "1h", bench.MIXP, 0) / "result.json").read_text())
        scored = [c["method"].split(":", 1)[1] for c in r["cells"] if c["target"] == t
                  and c["method"].startswith("baseline:")]
        assert zero_shot in mixp["weights"] and set(scored) <= set(mixp["weights"]), (mixp["weights"], scored)
        # the average: the grid mixture's members, each with the same weight at every lead
        mixa = json.loads((bench.job_dir(root / "runs", "mixa", t, "1h", bench.MIXA, 0) / "result.json").read_text())
        assert len(mixa["weights"]) == len(mix["weights"]) and zero_shot in mixa["weights"]
        assert all(w == pytest.approx(1 / len(mix["weights"]), abs=1e-4) for ws in mixa["weights"].values() for w in ws)
    # the verdict counts only the methods fixed before it; the post-hoc one adds the average
    assert bench.MIXA not in bench.TRANSFER and bench.MIXA in r["methods"]
    post = r["verdict_post_hoc"]
    assert bench.MIXA in post["rule"] and bench.MIXA not in r["verdict"]["rule"] and "note" in post
    for t, v in post["per_target"].items():
        best = min(c["mse_mean"] for c in r["cells"] if c["target"] == t
                   and c["method"] in bench.TRANSFER + bench.POST_HOC)
        assert v["best_transfer_mse"] == best <= r["verdict"]["per_target"][t]["best_transfer_mse"]
    md = out.with_suffix(".md").read_text()
    assert "## Verdict at ~1 hour of target data" in md and "| mch | 1h (60 min) |" in md
    assert "## Verdict with the post-hoc methods" in md


@pytest.fixture(scope="module")
def best_step(load_benchmark):
    return load_benchmark("convergence").best_step


def test_a_run_best_at_its_cap_is_resumed_with_the_cap_doubled(bench, tiny, best_step):
    root, _, _ = tiny
    p = dict(bench.load_preset("tiny"), target_steps=2, val_every=1, max_doublings=2)
    d = root / "double"
    r = bench.run_to_convergence(p, root / "runs", "mch", "1h", "scratch", 0, d)
    caps = [h["step_cap"] for h in r["history"]]
    assert caps == [2 * 2 ** k for k in range(len(caps))] and r["step_cap"] == caps[-1]
    for h in r["history"][:-1]:  # every cap but the last broke the rule
        assert h["step_cap"] < 1.25 * h["best_step"]
    assert r["converged"] == (r["step_cap"] >= 1.25 * r["best_step"])
    assert r["converged"] or r["doublings"] == 2
    assert r["best_step"] == best_step(d / "run")


def test_an_unconverged_run_set_aside_goes_on_from_its_last_checkpoint(bench, tiny, best_step):
    """--extend (after max_doublings was raised): the run continues from its last checkpoint with
    the cap doubled, keeps its history, and saves the best checkpoint's model."""
    import torch
    from safetensors.torch import load_file
    root, _, _ = tiny
    p = dict(bench.load_preset("tiny"), target_steps=4, val_every=1, max_doublings=0)
    d = root / "extend"
    r0 = bench.run_to_convergence(p, root / "runs", "mch", "1h", "scratch", 0, d)
    (d / bench.EXTENDED).write_text(json.dumps({**r0, "converged": False, "commit": "abc"}))  # as --extend does
    r = bench.run_to_convergence(dict(p, max_doublings=1), root / "runs", "mch", "1h", "scratch", 0, d)
    assert r["history"][0] == r0["history"][0] and [h["step_cap"] for h in r["history"]] == [4, 8]
    assert r["extended_from"] == {"step_cap": 4, "commit": "abc"} and not (d / bench.EXTENDED).exists()
    assert r["best_step"] == best_step(d / "run") and r["doublings"] == 1
    best = torch.load(d / "run" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    saved = load_file(str(d / "run" / "model" / "weights.safetensors"))
    assert saved and all(torch.equal(best["model." + k], v) for k, v in saved.items())


def test_rank_scores_rain_with_fewer_input_frames_than_a_baseline_reads(bench):
    """zoo.rank's baseline column leaves out a baseline that reads more frames than t_in (anvil
    reads 4; this benchmark's clips give 3) instead of failing the ranking."""
    from transmem import zoo
    from transmem.data import build_datasets
    p = bench.load_preset("tiny")
    exp = bench.experiment(p, {"name": "advected_rain", "train_clips": 4, "val_clips": 4, "test_clips": 4}, 2, 0)
    assert exp.train.t_in == 3
    out = zoo.baseline_mses(exp, build_datasets(exp.data)["val"])
    assert out["anvil"] is None and out["persistence"] > 0


def test_a_run_whose_worker_stopped_mid_stage_goes_on_from_its_last_checkpoint(bench, tiny, best_step):
    """A worker stopped inside a stage (here: after 2 of the stage's 4 steps) leaves the stage
    beside the run; the next worker keeps the run (resumable) and trains it on to that stage's cap
    from its last checkpoint, instead of from step 0."""
    import torch
    from convergence import resumable, stage_file
    root, _, _ = tiny
    p = dict(bench.load_preset("tiny"), target_steps=2, val_every=1, max_doublings=0)
    d = root / "stopped"
    r0 = bench.run_to_convergence(p, root / "runs", "mch", "1h", "scratch", 0, d)
    run = d / "run"
    assert not stage_file(run).exists() and not resumable(run)  # a finished run leaves no stage behind
    # as if stopped at step 2 of a 4-step first stage: no final metrics, the stage on disk
    (run / "metrics.json").unlink()
    stage_file(run).write_text(json.dumps({"history": [], "step_cap": 4, "stage": 0}))
    assert resumable(run)
    r = bench.run_to_convergence(dict(p, target_steps=4), root / "runs", "mch", "1h", "scratch", 0, d)
    assert [h["step_cap"] for h in r["history"]] == [4] and r["history"][0]["resumed"] is True
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    steps = [int(float(x.split(",")[1])) for x in (run / "logs" / "metrics.csv").read_text().splitlines()[1:]]
    assert min(steps) >= 2 and max(steps) >= 3  # the log of the resumed part: steps 1-2 were not trained again
    assert not stage_file(run).exists() and r["best_step"] == best_step(run) and r0["step_cap"] == 2


def test_the_weights_diagnostic_reproduces_the_mixture_and_its_oracle_is_a_bound(tiny, load_benchmark, tmp_path):
    """benchmarks/transfer_radar_weights.py: with validation weights it scores exactly the stored
    mixture, and weights fit on the test clips do no worse there (the grid's best on those clips)."""
    root, _, r = tiny
    diag = load_benchmark("transfer_radar_weights")
    out = tmp_path / "weights.json"
    assert diag.main(["--preset", "tiny", "--root", str(root / "runs"), "--json", str(out)]) == 0
    cells = json.loads(out.read_text())["cells"]
    assert {(c["target"], c["seed"]) for c in cells} == {("mch", 0), ("fmi", 0)}
    stored = {c["target"]: c["mse_mean"] for c in r["cells"] if c["method"] == "mix:ft-auto+zoo+baseline"}
    for c in cells:
        assert c["val_weights_test_mse"] == pytest.approx(c["stored_mix_test_mse"], rel=1e-6)
        assert c["stored_mix_test_mse"] == pytest.approx(stored[c["target"]], rel=1e-9)
        assert c["oracle_test_mse"] <= c["val_weights_test_mse"] + 1e-9
        assert c["oracle_test_mse"] <= min(c["members_test_mse"].values()) + 1e-9  # each member is a vertex
        k = len(c["members_test_mse"])  # the average's error: at most the members' mean error (convexity)
        assert 0 < c["equal_weights_test_mse"] <= sum(c["members_test_mse"].values()) / k + 1e-9
        for w in (c["val_weights"], c["oracle_weights"]):
            assert set(w) == set(c["members_test_mse"]) and sum(w.values()) == pytest.approx(1.0)


def test_the_paired_diagnostic_scores_the_verdicts_forecasters_clip_by_clip(bench, tiny, load_benchmark, tmp_path):
    """benchmarks/transfer_radar_paired.py: clip by clip, each forecaster scores exactly its row of
    transfer_radar.json (the script refuses otherwise), and the tile statistics average the clips."""
    root, radar_json, r = tiny
    paired = load_benchmark("transfer_radar_paired")
    out = tmp_path / "paired.json"
    assert paired.main(["--preset", "tiny", "--root", str(root / "runs"), "--results", str(radar_json),
                        "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [c["target"] for c in res["cells"]] == ["mch", "fmi"]
    for c in res["cells"]:
        row = r["verdict"]["per_target"][c["target"]]
        assert c["best_transfer_mse"] == pytest.approx(row["best_transfer_mse"], rel=1e-4)
        n = c["tiles"]
        assert len(c["against"]) == 3 and n == bench.load_preset("tiny")["tiles"][c["target"]] ** 2
        for s in c["against"].values():
            assert len(s["per_tile_diff"]) == s["tiles"] == n and s["clips"] == c["test_clips"]
            assert sum(s["per_tile_diff"]) / n == pytest.approx(s["mean_diff"], rel=1e-6)  # tiles hold equal clips
            assert s["blocks"] == n * c["blocks_per_tile"] and s["clips_ahead"] <= s["clips"]
            assert s["diff_pct"] == pytest.approx(100 * s["mean_diff"] / s["bar_mse"])
            assert s["verdict"] in ("ahead", "behind", "tie")
            if n == 1:  # no test over one tile: never a win
                assert s["p_tiles"] is None and s["verdict"] == "tie"
    assert set(res["targets_won_significantly"]) <= {"mch", "fmi"}


def test_a_paired_difference_is_a_win_only_when_both_tests_say_so(load_benchmark):
    import numpy as np
    paired = load_benchmark("transfer_radar_paired")
    tile, block = np.repeat(np.arange(4), 6), np.tile(np.arange(6), 4)
    rng = np.random.default_rng(0)
    steady = -1.0 + 0.05 * rng.standard_normal(24)  # ahead on every tile and block
    s = paired.tests(steady, tile, block)
    assert s["tiles_ahead"] == 4 and s["blocks_ahead"] == 24 and s["p_tiles"] < 0.05 and s["p_blocks"] < 0.05
    assert paired.verdict_word(-5.0, s) == "ahead" and paired.verdict_word(5.0, s) == "behind"
    one_tile = np.where(tile == 0, -4.0, 0.0) + 0.05 * rng.standard_normal(24)  # a mean won by one tile
    s = paired.tests(one_tile, tile, block)
    assert s["mean_diff"] < 0 and s["tiles_ahead"] <= 2 and s["p_tiles"] > 0.05
    assert paired.verdict_word(-5.0, s) == "tie"


def _networks_file(bench, path, edit=None, names=None):
    """A copy of the shipped networks file: ``names`` renames entries (old -> new), ``edit(doc)`` changes it."""
    import yaml
    doc = yaml.safe_load(bench.NETWORKS_FILE.read_text())
    doc = {(names or {}).get(k, k): v for k, v in doc.items() if not names or k in names}
    if edit:
        edit(doc)
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["mch"].pop("minutes"), "mch.minutes: missing"),
    (lambda d: d["mch"].update(region_km="big"), "mch.region_km: expected"),
    (lambda d: d["mch"].update(val=[["20160711", 20, 40]]), "mch.val: ['20160711', 20, 40] shares frames"),
    (lambda d: d["fmi"].update(test=[["20170509", 0, 20], ["20170509", 20, 40]]), "fmi.test: one test window"),
    (lambda d: d["opera"].update(train=[[None, 12, 0]]), "opera.train: [None, 12, 0]: a window is"),
    (lambda d: d["mrms"].update(colour="red"), "mrms.colour: unknown key"),
    (lambda d: d.update({"advected_rain": d["mch"]}), "'advected_rain': a network name"),
])
def test_a_bad_networks_file_is_refused_in_one_line_naming_the_key(bench, tmp_path, edit, where):
    f = _networks_file(bench, tmp_path / "networks.yaml", edit)
    with pytest.raises(SystemExit) as e:
        bench.load_networks(f)
    msg = str(e.value.code)
    assert msg.startswith(f"{f}: ") and where in msg and "\n" not in msg, msg


def test_a_missing_source_is_refused_before_any_run_folder_exists(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "NETWORKS", bench.NETWORKS)  # main's --networks replaces it: restored after
    f = _networks_file(bench, tmp_path / "networks.yaml",
                       lambda d: d["mch"]["source"].update(path=str(tmp_path / "nowhere")),
                       names={"mch": "mch", "fmi": "fmi"})  # the networks the tiny preset tiles
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "tiny", "--networks", str(f), "--root", str(root)])
    assert str(e.value.code).startswith(f"{f}: mch.source.path: {tmp_path / 'nowhere'} not found")
    assert not root.exists()


@pytest.mark.parametrize("edit, where", [
    (lambda d: d["fmi"].update(val=[["20160928", 28, 32]]), "fmi.val: ['20160928', 28, 32] holds 4 frames, fewer than a clip's 6"),
    (lambda d: d["mch"].update(train=[["20150515", 0, 5]]), "mch.train: no window holds a clip's 6 frames"),
    (lambda d: d["fmi"].update(test=[["20170509", 0, 48]]), "fmi.test: ['20170509', 0, 48] ends past the 40 frames of "
                                                            "event 20170509"),
    (lambda d: d["mch"].update(val=[["19990101", 0, 12]]), "mch.val: ['19990101', 0, 12]: "),
])
def test_a_window_without_clips_or_past_its_event_is_refused_before_any_run(bench, tmp_path, monkeypatch, shared_data,
                                                                           edit, where):
    """A held-out network's file is checked against its data before anything runs: a window past
    its event's end would give fewer clips than the JSON counts, silently."""
    if not (shared_data / "radar" / "mch").is_dir() or not (shared_data / "radar" / "fmi").is_dir():
        pytest.skip(f"{shared_data}/radar: the MeteoSwiss and FMI events are absent")
    monkeypatch.setattr(bench, "NETWORKS", bench.NETWORKS)
    monkeypatch.setattr(bench, "SHARED", shared_data)
    f = _networks_file(bench, tmp_path / "networks.yaml", edit, names={"mch": "mch", "fmi": "fmi"})
    root = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "tiny", "--networks", str(f), "--root", str(root)])
    msg = str(e.value.code)
    assert msg.startswith(f"{f}: ") and where in msg and "\n" not in msg, msg
    assert not root.exists()


def test_a_reader_without_extra_events_gets_its_event_by_sequence_name(bench, monkeypatch, shared_data, tmp_path):
    """A held-out network may come through a reader that reads every event of its folder (hdf5,
    pysteps, gridded files): the tiles then keep the sequences of the window's event, the same
    clips as a reader that reads that event alone; a name not found lists those found."""
    import torch

    from transmem.data import DataConfig, build_datasets
    from transmem.data.errors import DataError
    if not (shared_data / "radar" / "mch").is_dir():
        pytest.skip(f"{shared_data}/radar/mch: the MeteoSwiss events are absent")
    monkeypatch.setattr(bench, "SHARED", shared_data)
    p = bench.load_preset("tiny")

    def clips(part):
        cfg = DataConfig.from_dict({"name": "transfer_radar_tiles", "size": 16, "frames": 6, "cache_dir": str(tmp_path),
                                    "extra": part["extra"]})
        d = build_datasets(cfg)["train"]
        return torch.stack([d[i]["frames"] for i in range(len(d))])
    window = bench.NETWORKS["mch"]["val"][0]
    alone = clips(bench.tile_part("mch", window, p))
    monkeypatch.setattr(bench, "extra_keys", lambda name: ())  # as if radar_mch had no extra.events
    part = bench.tile_part("mch", window, p)
    assert part["extra"]["event"] == window[0] and "events" not in part["extra"]["source"]["extra"]
    assert len(alone) == 12 - 6 + 1 and torch.equal(clips(part), alone)
    with pytest.raises(DataError) as e:
        clips(bench.tile_part("mch", ("19990101", 0, 12), p))
    assert "event 19990101: no sequence of that name (found: 20150515, 20160711, 20170131)" in str(e.value)


def test_new_networks_are_one_entry_each_in_a_networks_file(bench, tmp_path, monkeypatch, shared_data, load_benchmark):
    """The protocol on networks the script has never named: two entries of a networks file (the
    MeteoSwiss and FMI data under other names, one tile each), and nothing else changed."""
    if not (shared_data / "radar" / "mch").is_dir() or not (shared_data / "radar" / "fmi").is_dir():
        pytest.skip(f"{shared_data}/radar: the MeteoSwiss and FMI events are absent")
    monkeypatch.setattr(bench, "NETWORKS", bench.NETWORKS)
    monkeypatch.setattr(bench, "SHARED", shared_data)
    monkeypatch.delenv("TRANSMEM_RADAR_CACHE", raising=False)

    def one_tile(d):
        for v in d.values():
            v["tiles"] = 1
    f = _networks_file(bench, tmp_path / "mine.yaml", one_tile, names={"mch": "alpine", "fmi": "nordic"})
    out = tmp_path / "mine.json"
    assert bench.main(["--preset", "tiny", "--networks", str(f), "--root", str(tmp_path / "runs"),
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert list(r["networks"]) == ["alpine", "nordic"] and r["complete"] and f"--networks {f}" in r["command"]
    assert set(r["verdict"]["per_target"]) == {"alpine", "nordic"} and r["verdict"]["goal"] == "at least 2 of 2 targets"
    assert {c["target"] for c in r["cells"]} == {"alpine", "nordic"}
    zero_shot = {c["target"]: c["entry"] for c in r["cells"] if c["method"] == "zero-shot"}
    assert zero_shot["alpine"] in ("advected_rain", "nordic") and zero_shot["nordic"] in ("advected_rain", "alpine")
    assert sorted(p.name for p in (tmp_path / "runs" / "zoo").iterdir()) == ["advected_rain", "alpine", "nordic"]
    # the diagnostics read the same networks file
    for name, extra in (("transfer_radar_weights", []), ("transfer_radar_paired", ["--results", str(out)])):
        diag = load_benchmark(name)
        monkeypatch.setattr(diag.tr, "NETWORKS", diag.tr.NETWORKS)  # the imported module's: --networks replaces it
        monkeypatch.setattr(diag.tr, "SHARED", shared_data)
        j = tmp_path / f"{name}.json"
        assert diag.main(["--preset", "tiny", "--networks", str(f), "--root", str(tmp_path / "runs"), "--json", str(j),
                          *extra]) == 0
        d = json.loads(j.read_text())
        assert {c["target"] for c in d["cells"]} == {"alpine", "nordic"} and f"--networks {f}" in d["command"]


def test_a_folder_refuses_runs_of_another_setup_and_takes_more_seeds_and_networks(bench, tmp_path, monkeypatch,
                                                                                    shared_data):
    import copy
    if not (shared_data / "radar" / "mch").is_dir() or not (shared_data / "radar" / "fmi").is_dir():
        pytest.skip(f"{shared_data}/radar: the MeteoSwiss and FMI events are absent")
    monkeypatch.setattr(bench, "NETWORKS", copy.deepcopy(bench.NETWORKS))
    monkeypatch.setattr(bench, "SHARED", shared_data)
    p = bench.load_preset("tiny")
    root = tmp_path / "runs"
    bench.check_setup(root, p, write=True)
    stamp = json.loads((root / bench.STAMP).read_text())
    assert set(stamp["networks"]) == {"mch", "fmi"} and "seeds" not in stamp["preset"]
    bench.check_setup(root, dict(p, seeds=[0, 1, 2], max_doublings=9), write=True)  # more of the same: fine
    for changed, where in ((dict(p, tiles={**p["tiles"], "fmi": 2}), "fmi.tiles"),
                           (dict(p, target_steps=p["target_steps"] + 1), "preset key target_steps")):
        with pytest.raises(SystemExit) as e:
            bench.check_setup(root, changed, write=True)
        assert str(e.value.code).startswith(f"{root / bench.STAMP}: {where}: ") and "another --root" in str(e.value.code)
    bench.NETWORKS["mch"]["region_km"] = 256
    with pytest.raises(SystemExit) as e:
        bench.main(["--preset", "tiny", "--root", str(root)])
    assert "mch.region_km: the runs here were made with 512, now 256" in str(e.value.code)
    assert sorted(x.name for x in root.iterdir()) == [bench.STAMP]  # nothing ran
    bench.NETWORKS["mch"]["region_km"] = 512
    bench.NETWORKS["mch"]["title"] = "MeteoSwiss, renamed"  # a label: the runs do not depend on it
    bench.check_setup(root, p, write=True)
    bench.NETWORKS["alpine"] = bench.NETWORKS["mch"]
    bench.check_setup(root, dict(p, networks=["alpine"], tiles={"alpine": 1}), write=True)  # a new one joins
    assert set(json.loads((root / bench.STAMP).read_text())["networks"]) == {"mch", "fmi", "alpine"}
