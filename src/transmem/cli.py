"""`transmem ...`: demo, data, models, pretrain, finetune, transfer, evaluate, predict, zoo, bench.

Every training command takes ``--config FILE.yaml`` plus ``--section.key value`` overrides
(e.g. ``--train.steps 500 --data.num_digits 3``); unknown keys are errors. Bad input ends with a
one-line ``transmem: error: ...`` and exit status 2.
"""
from __future__ import annotations

from . import signals as _signals

_STARTUP_SIGNALS = _signals.install_startup()  # SIGINT/SIGTERM while the imports below run: one line

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import transmem
from .choices import PROBE_STEPS, TMU_MODES
from .errors import UserError

# torch, Lightning and the rest are imported where a command needs them: `transmem --help`,
# `--version` and argument errors answer without loading torch (about 0.1 s instead of 8-14 s)


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or "." not in tok:
            parser.error(f"unrecognized argument {tok!r} (overrides are --section.key value)")
        key = tok[2:]
        if "=" in key:
            key, val = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                parser.error(f"{tok} needs a value")
            val = rest[i + 1]
            i += 2
        out[key] = val
    return out


def _common(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--config", help="YAML experiment config (sections data, model, train, transfer, eval)")
    p.add_argument("--out", required=out_required, help="run folder (never overwritten)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--zoo-name", help="also save the trained model under this name in the zoo root")
    p.add_argument("--zoo-root", help="zoo root folder (default: $TRANSMEM_ZOO or ./zoo)")


class _Registered:
    """Choices read from a registry (``list_models``, ``list_baselines``) when a choice is checked
    or listed, so that building the parser, and ``transmem --help``, import no torch; and so that
    a backbone or baseline added by a file or a plugin is a valid choice with no edit here."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function

    def _names(self) -> list[str]:
        import importlib
        return list(getattr(importlib.import_module(self.module, __package__), self.function)())

    def __contains__(self, name) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())


BASELINES = _Registered(".baselines", "list_baselines")


class UsageError(SystemExit):
    """A bad command line (argparse's error), already reported in one line; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one line every other error is: ``transmem: error: ...``."""

    def error(self, message):
        msg = " ".join(str(message).split())
        cmd = self.prog.removeprefix("transmem").strip()
        print(f"transmem: error: {cmd + ': ' if cmd else ''}{msg} (see {self.prog} --help)", file=sys.stderr)
        raise UsageError(2)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="transmem", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"transmem {transmem.__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("demo", help="pretrain two zoo models, transfer to a new task, compare, report")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="the same path on tiny sizes (about a minute)")
    p.add_argument("--mnist", help="folder with real MNIST IDX files (default: built-in digits)")
    p.add_argument("--no-bank-read", action="store_true", help="skip the bank_read TMU row")

    p = sub.add_parser("data", help="list datasets, or export clips of one to .npy")
    p.add_argument("action", choices=["list", "export"])
    p.add_argument("--config")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="export: the .npy file to write (N, T, C, H, W) uint8")

    p = sub.add_parser("models", help="list the registered models (backbones and transfer models)")
    p.add_argument("--kind", help="only this kind (backbone, transfer)")

    p = sub.add_parser("pretrain", help="train a backbone without labels; also trains from scratch on a target")
    _common(p)
    p = sub.add_parser("finetune", help="train starting from a zoo entry")
    _common(p)
    p.add_argument("--from", dest="init_from", required=True,
                   help="zoo entry to start from (a folder, or a name under --zoo-root), or 'auto': the best "
                        "for this target by `zoo rank` (under --zoo-root; the ranking goes to ranking.json in --out)")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="with 'auto': finetuning steps of the ranking's probe (0: zero-shot only)")
    p = sub.add_parser("transfer", help="train a TMU target that draws on frozen zoo teachers")
    _common(p)
    p.add_argument("--teachers", nargs="+",
                   help="zoo entries (folders, or names under --zoo-root), or auto[:K]: the K best teachers "
                        "for this target by `zoo rank` (K = 1 unless given)")
    p.add_argument("--distill-weight", type=float, help="lambda of L_distill (config transfer.distill_weight)")
    p.add_argument("--mode", choices=TMU_MODES, help="config transfer.mode")
    p.add_argument("--init-from", help="zoo entry (folder or name under --zoo-root) to initialise the target backbone, "
                                       "or 'auto': the best finetune entry by `zoo rank`")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="with 'auto': finetuning steps of the ranking's probe (0: zero-shot only)")

    p = sub.add_parser("evaluate", help="per-frame MSE/MAE/SSIM/PSNR of a zoo model or a baseline on a dataset")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="zoo entry to evaluate")
    who.add_argument("--baseline", choices=BASELINES,
                     help="a reference nowcast instead of a model (the registered ones; see docs/baselines.md)")
    p.add_argument("--blend", metavar="BASELINE[:W]",
                   help="score W * model + (1 - W) * BASELINE (W = 0.5 unless given), e.g. extrapolation")
    p.add_argument("--config")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the earlier results (metrics.json, report, figures) in --out")

    p = sub.add_parser("compare", help="score several models (and the baselines) on the same clips, side by side")
    p.add_argument("runs", nargs="+", help="run folders (their model/) or zoo entries (folders or names under --zoo-root)")
    p.add_argument("--baselines", action="store_true", help="also score persistence and extrapolation")
    p.add_argument("--config", help="the data to compare on (default: the first run's config.yaml, else its card's "
                                    "data), plus --section.key overrides")
    p.add_argument("--out", required=True, help="folder for metrics.json (one entry per method) and the report")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out")
    p.add_argument("--zoo-root", help="zoo root for entry names (default: $TRANSMEM_ZOO or ./zoo)")

    p = sub.add_parser("predict", help="forecast from the last T_in frames of a file or folder")
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--baselines", nargs="?", const="default", metavar="NAME[,NAME...]",
                   help="also write reference nowcasts of the same input: the data's default ones "
                        "(persistence, extrapolation; for rain also S-PROG, ANVIL, STEPS mean), or those named "
                        "(`transmem evaluate --help` lists them)")
    p.add_argument("--native", action="store_true",
                   help="read the input at its own grid (no resize to the model's training size): the "
                        "forecast lies on the input's grid, e.g. a whole 1 km radar composite")
    p.add_argument("--leads", type=int, help="frames to forecast (default: the model's T_out)")
    p.add_argument("--tile", type=int, help="forecast in overlapping tiles of at most this many pixels a side "
                                            "(for fields too large for memory; blended without seams)")
    p.add_argument("--format", choices=["npy", "netcdf", "both"], default=None,
                   help="forecast file: prediction.npy, CF-netCDF forecast.nc (with units, times and "
                        "coordinates), or both; default netcdf when the input has coordinates, else npy")
    p.add_argument("--blend", metavar="BASELINE[:W]",
                   help="forecast W * model + (1 - W) * BASELINE (W = 0.5 unless given), e.g. extrapolation")

    p = sub.add_parser("zoo", help="list the zoo, show one card, or rank the zoo for a target")
    p.add_argument("action", choices=["list", "show", "rank"])
    p.add_argument("name", nargs="?")
    p.add_argument("--root", "--zoo-root", dest="root", help="zoo root folder (default: $TRANSMEM_ZOO or ./zoo)")
    p.add_argument("--config", help="rank: the target's YAML experiment config (plus --section.key overrides)")
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help="rank: finetuning steps of the probe on the target (0: zero-shot only)")
    p.add_argument("--json", help="rank: also write the ranking to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="rank: replace an existing --json file")

    p = sub.add_parser("bench", help="time training steps and inference rollouts")
    p.add_argument("--model", default="convlstm", choices=_Registered(".models", "list_models"), metavar="MODEL",
                   help="a registered model (`transmem models`)")
    p.add_argument("--backbone", default="convlstm", help="TMU target backbone")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--filter", type=int, default=5)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--cached-bank", action="store_true")
    p.add_argument("--mode", choices=["train", "infer", "both"], default="both")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json")
    return ap


#: SIGINT / SIGTERM (see :mod:`transmem.signals`): raised by the handlers :func:`main` installs
Interrupted = _signals.Interrupted


def _install_signal_handlers() -> dict:
    return _signals.install()


def main(argv: list[str] | None = None) -> int:
    old = _install_signal_handlers()  # first: a signal from here on ends in one line, 130 / 143
    try:
        ap = build_parser()
        args, rest = ap.parse_known_args(argv)
        rc = _dispatch(args, rest, ap)
        sys.stdout.flush()  # a closed pipe (`transmem zoo show X | head`) shows here, not at exit
        return rc
    except BrokenPipeError:
        _stdout_to_devnull()
        return 0
    except UsageError as e:
        return e.code
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(_signals.message(signum), file=sys.stderr)
        return 128 + int(signum)
    except SystemExit as e:  # a library's exit without a code (Lightning's SIGTERM) is no success
        if e.code is None and _signals.pending() is not None:
            print(_signals.message(_signals.pending()), file=sys.stderr)
            return 128 + _signals.pending()
        raise
    except (UserError, OSError) as e:  # bad input, or the OS refusing a file: one clean line
        print(f"transmem: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        _signals.restore(old)


def _stdout_to_devnull() -> None:
    """The reader of standard output went away (``| head``): what is left is dropped quietly, as
    for any command line tool, and Python's flush at exit finds nothing to write."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _one_line(e: Exception) -> str:
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e)
    return " ".join(msg.split())


def _dispatch(args, rest, ap) -> int:
    zoo_rank = args.cmd == "zoo" and args.action == "rank"  # takes the config's overrides
    if args.cmd == "compare":
        return _compare(args, _split_overrides(rest, ap))
    if args.cmd in ("demo", "zoo", "predict", "bench", "models") and rest and not zoo_rank:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    overrides = _split_overrides(rest, ap)
    from .config import ConfigError, load_experiment, validate

    if args.cmd == "demo":
        from .demo import run_demo
        run_demo(args.out, quick=args.quick, mnist_dir=args.mnist, bank_read=not args.no_bank_read)
        return 0

    if args.cmd == "models":
        from .models import list_models
        names = list_models(kind=args.kind)
        if not names:
            raise ConfigError(f"--kind {args.kind}: no models of this kind; kinds: backbone, transfer")
        print("\n".join(names))
        return 0

    if args.cmd == "zoo":
        from .zoo import read_card, resolve, scan_entries
        if args.action == "rank":
            return _zoo_rank(args, overrides, ap)
        if args.action == "list":
            print(format_zoo_table(scan_entries(args.root)))
        else:
            if not args.name:
                ap.error("zoo show needs a NAME")
            print(json.dumps(read_card(resolve(args.name, args.root)), indent=2))
        return 0

    if args.cmd == "bench":
        from .bench import run_bench
        run_bench(args)
        return 0

    if args.cmd == "predict":
        from .blend import parse_blend
        from .predict import run_predict
        try:
            blend = parse_blend(args.blend) if args.blend else None
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if blend and blend[0] not in BASELINES:
            raise ConfigError(f"--blend {args.blend!r}: the baseline must be one of {', '.join(BASELINES)}")
        wrong = [n for n in (args.baselines or "default").split(",") if n not in (*BASELINES, "default")]
        if wrong:
            raise ConfigError(f"--baselines {args.baselines!r}: unknown {', '.join(wrong)}; "
                              f"choose from {', '.join(BASELINES)}")
        run_predict(args.model, args.input, args.out, baselines=args.baselines, fmt=args.format, blend=blend,
                    native=args.native, leads=args.leads, tile=args.tile)
        return 0

    exp = load_experiment(args.config, overrides)  # config errors answer before Lightning is loaded
    from . import api

    if args.cmd == "data":
        from .data import list_datasets
        if args.action == "list":
            print("\n".join(list_datasets()))
            return 0
        if not args.out:
            ap.error("data export needs --out FILE.npy")
        return _export(exp, args.split, args.out)
    if args.cmd == "pretrain":
        m = api.run_train(exp, args.out, args.resume, zoo_name=args.zoo_name, zoo_root=args.zoo_root)
    elif args.cmd == "finetune":
        m = api.run_train(exp, args.out, args.resume, init_from=args.init_from,
                          zoo_name=args.zoo_name, zoo_root=args.zoo_root, probe_steps=args.probe_steps)
    elif args.cmd == "transfer":
        if args.distill_weight is not None:
            exp.transfer.distill_weight = args.distill_weight
        if args.mode:
            exp.transfer.mode = args.mode
        if args.init_from:
            exp.transfer.init_from = args.init_from
        validate(exp)  # the flags above, as the config's values
        m = api.run_transfer(exp, args.out, args.resume, teachers=args.teachers,
                             zoo_name=args.zoo_name, zoo_root=args.zoo_root, probe_steps=args.probe_steps)
    elif args.cmd == "evaluate":
        m = _evaluate(args, exp)
    else:  # pragma: no cover - argparse guards the choices
        ap.error(f"unknown command {args.cmd}")
    print(_summary_line(m))
    return 0


def _summary_line(m: dict) -> str:
    parts = [f"{k}={m[k]:.4g}" for k in ("mse", "mse_pixel", "mae", "ssim", "psnr") if isinstance(m.get(k), float)]
    units = f" {m['units']}" if isinstance(m.get("units"), str) else ""
    parts += [f"{k}={m[k]:.4g}{units}" for k in ("rmse_physical", "mae_physical")
              if isinstance(m.get(k), float)]
    return "test: " + " ".join(parts)


def _evaluate(args, exp) -> dict:
    """``evaluate``: metrics.json and the report (plots, forecast GIFs, TMU maps) in --out."""
    from . import api
    from .blend import parse_blend
    from .config import ConfigError
    from .data import adopt_fitted
    from .files import atomic_folder
    from .run_report import method_report
    from .zoo import read_card, resolve
    try:
        blend = parse_blend(args.blend) if args.blend else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if blend and (args.baseline or blend[0] not in BASELINES):
        raise ConfigError(f"--blend {args.blend!r}: give --model and one of {', '.join(BASELINES)}")
    # --out is locked first (a second evaluate into it is refused), and the results are written
    # into a temporary folder that replaces --out only once complete (Ctrl-C: all or nothing)
    with api.claim_output(args.out):
        if args.model:  # a field normalised as the model was trained on it (data.adopt_fitted)
            adopt_fitted(exp.data, read_card(resolve(args.model)).get("data"))
        datasets = api.eval_datasets(exp, args.out, args.overwrite)  # checked before anything is loaded or written
        if args.baseline:
            forecaster, name, label = api.load_baseline(args.baseline, exp), args.baseline, args.baseline
        else:
            api.check_model_fits(read_card(resolve(args.model)), exp, datasets)
            forecaster, card = api.load_for_inference(args.model)
            name, label = card.get("name") or Path(str(args.model)).name, str(args.model)
        if blend:
            forecaster = api.blend_with_baseline(forecaster, blend[0], exp.train.t_in, blend[1], exp.data)
            name, label = f"{name}+{blend[0]}", f"{blend[1]:g} * {label} + {1 - blend[1]:g} * {blend[0]}"
        with atomic_folder(args.out, replace=True, keep_others=True) as tmp:
            metrics = api.run_evaluate(forecaster, exp, tmp, datasets, label=label, overwrite=args.overwrite)
            method_report(tmp, f"transmem evaluate: {name} on {exp.data.name} ({exp.eval.split})",
                          {name: metrics}, {name: forecaster}, datasets[exp.eval.split], forecaster.t_in,
                          examples=exp.eval.examples, settings={"model": label, "data": exp.data.to_dict()})
    return metrics


def _compare(args, overrides) -> int:
    """``compare``: every model (and with ``--baselines`` every baseline) scored on the same
    clips of one dataset; ``metrics.json`` maps method -> metrics, the report holds the side-by-side
    table, the per-lead plots and the example forecasts, and the table is printed."""
    from . import api
    from .baselines import BaselineUnavailable, default_baselines
    from .config import load_experiment
    from .data import adopt_fitted, physical_units
    from .files import write_json
    from .run_report import method_report
    from .zoo import read_card, resolve
    entries = []
    for ref in args.runs:
        p = Path(ref)
        entry = p / "model" if (p / "model" / "card.json").is_file() else resolve(ref, args.zoo_root)
        label = p.name or str(p)
        while label in [e[0] for e in entries]:
            label += "'"
        entries.append((label, p, entry, read_card(entry)))
    config = args.config or next((str(p / "config.yaml") for _, p, _, _ in entries if (p / "config.yaml").is_file()),
                                 None)
    if config is not None:
        exp = load_experiment(config, overrides)
    else:  # a zoo entry: the data its card records
        card = entries[0][3]
        exp = load_experiment(None, overrides, base={"data": dict(card.get("data") or {}),
                                                     "train": {"t_in": int(card.get("t_in", 10))}})
    adopt_fitted(exp.data, entries[0][3].get("data"))
    datasets = api.eval_datasets(exp, args.out, args.overwrite)  # checked before anything is loaded or written
    forecasters = {}
    for label, _, entry, card in entries:
        api.check_model_fits(card, exp, datasets)
        forecasters[label] = api.load_for_inference(entry)[0]
    for name in default_baselines(physical_units(exp.data)) if args.baselines else ():
        try:
            forecasters[name] = api.load_baseline(name, exp)
        except BaselineUnavailable as e:
            print(f"baseline {name} left out: {e}")
    metrics = {}
    for name, f in forecasters.items():
        f.t_in = exp.train.t_in
        metrics[name] = api.evaluate_forecaster(exp, f, datasets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    method_report(out, f"transmem compare on {exp.data.name} ({exp.eval.split}, {len(datasets[exp.eval.split])} clips)",
                  metrics, forecasters, datasets[exp.eval.split], exp.train.t_in, examples=exp.eval.examples,
                  settings={"runs": [str(e[2]) for e in entries], "data": exp.data.to_dict()})
    print(format_compare_table(metrics))
    return 0


def format_compare_table(metrics: dict) -> str:
    """Methods side by side (best MSE first): MSE/frame, MSE/pixel, SSIM, and RMSE in the data's
    units where it declares them."""
    units = next((m["units"] for m in metrics.values() if isinstance(m.get("units"), str)), None)
    head = ("method", "MSE/frame", "MSE/pixel", "SSIM") + ((f"RMSE ({units})", f"MAE ({units})") if units else ())

    def num(x):
        return f"{x:.4g}" if isinstance(x, (int, float)) else "-"
    order = sorted(metrics, key=lambda n: (metrics[n].get("mse") is None, metrics[n].get("mse") or 0.0))
    rows = [head] + [(n, num(metrics[n].get("mse")), num(metrics[n].get("mse_pixel")), num(metrics[n].get("ssim")))
                     + ((num(metrics[n].get("rmse_physical")), num(metrics[n].get("mae_physical"))) if units else ())
                     for n in order]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _export(exp, split: str, out: str) -> int:
    import numpy as np

    from .data import build_datasets
    from .files import atomic_write
    if os.path.exists(out):
        raise FileExistsError(f"{out}: exists; not overwriting")
    ds = build_datasets(exp.data)[split]
    arr = np.stack([(ds[i]["frames"].numpy() * 255).round().astype(np.uint8) for i in range(len(ds))])

    def save(tmp):
        with open(tmp, "wb") as f:
            np.save(f, arr)
    atomic_write(out, save)
    print(f"wrote {out}: {arr.shape} uint8")
    return 0


def format_zoo_table(entries) -> str:
    """The zoo as a table; ``entries`` as :func:`~transmem.zoo.scan_entries` gives them (or
    ``(path, card)`` pairs): an unusable entry is a row with its problem."""
    rows = [("name", "backbone", "data", "frame", "T_in->T_out", "steps", "test MSE/frame")]
    for path, card, *problem in entries:
        if card is None:
            rows.append((path.name, f"unusable: {problem[0] if problem else 'bad card'}", "", "", "", "", ""))
            continue
        data = card.get("data", {})
        desc = data.get("name", "?")
        if desc == "flying_digits":
            desc = f"flying_digits k={data.get('num_digits')}"
        model = card.get("model", "?")
        if model == "tmu":
            model = f"tmu({card['config'].get('backbone')}, {len(card['config'].get('source_names', []))} src)"
        size = card.get("frame_size", ["?", "?"])
        mse = card.get("metrics", {}).get("mse")
        rows.append((path.name, model, desc, f"{size[0]}x{size[1]}",
                     f"{card.get('t_in', '?')}->{card.get('t_out', '?')}",
                     str(card.get("train", {}).get("steps", "?")),
                     f"{mse:.2f}" if isinstance(mse, (int, float)) else "-"))
    if len(rows) == 1:
        return "(zoo is empty)"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _zoo_rank(args, overrides, ap) -> int:
    """``zoo rank``: the table (and ``--json``) of :func:`transmem.zoo.rank` for a target."""
    from . import api
    from .config import ConfigError, load_experiment
    from .files import write_json
    from .zoo import ZooError, candidates, rank
    if not args.config:
        ap.error("zoo rank needs --config TARGET.yaml (the target task)")
    if args.name:
        ap.error(f"zoo rank takes no NAME (got {args.name!r}); it ranks every entry under --zoo-root")
    if args.probe_steps < 0:
        raise ConfigError(f"--probe-steps {args.probe_steps}: must be 0 (zero-shot only) or more")
    if args.json:  # checked before anything is ranked
        out = Path(args.json)
        if out.is_dir():
            raise api.RunFolderError(f"{out}: is a folder; --json needs a file name (nothing was ranked)")
        if out.exists() and not args.overwrite:
            raise api.RunFolderError(f"{out}: exists; pass --overwrite to replace it, or choose another "
                                     "--json (nothing was ranked)")
    exp = load_experiment(args.config, overrides)
    paths, where = candidates(args.root)
    if not paths:
        raise ZooError(f"{where}: no zoo entries to rank (give --zoo-root DIR or set TRANSMEM_ZOO)")
    ranking = rank(exp, zoo_root=args.root, probe_steps=args.probe_steps, seed=exp.train.seed,
                   progress=exp.train.progress)
    print(format_rank_table(ranking))
    if args.json:
        write_json(args.json, ranking.to_dict())
        print(f"wrote {args.json}")
    return 0


def format_rank_table(ranking) -> str:
    """The zoo ranked for a target: one row per entry (best first, unusable ones last with the
    reason) and one per baseline, MSE per frame on the target's validation clips."""
    def num(x):
        return f"{x:.4g}" if isinstance(x, (int, float)) else "-"
    k = ranking.probe_steps
    rows = [("rank", "name", "model", "usable as", "zero-shot MSE", f"probe MSE ({k} steps)" if k else "probe MSE",
             "note")]
    for r in ranking.rows:
        rows.append((str(r["rank"] or "-"), r["name"], r.get("model") or "?",
                     ", ".join(r["uses"]) if r["usable"] else "unusable",
                     num(r["zero_shot_mse"]), num(r["probe_mse"]), r["reason"] or ""))
    for name, mse in ranking.baselines.items():
        rows.append(("-", name, "baseline", "reference", num(mse), "-",
                     "" if mse is not None else "not installed: pip install 'transmem[nowcast]'"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    t = ranking.target
    head = (f"{len(ranking.rows)} zoo entries ({t.get('zoo')}) ranked for {t['data'].get('name')} "
            f"(validation: {t.get('val_clips')} clips, "
            f"score: {ranking.score_key}, seed {ranking.seed}, {ranking.wall_s:.1f} s)")
    return head + "\n" + "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


if __name__ == "__main__":
    sys.exit(main())
_signals.restore(_STARTUP_SIGNALS)  # imported, not run: main() installs its own handlers
