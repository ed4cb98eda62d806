"""`transmem ...`: demo, data, models, pretrain, finetune, transfer, evaluate, predict, zoo, bench.

Every training command takes ``--config FILE.yaml`` plus ``--section.key value`` overrides
(e.g. ``--train.steps 500 --data.num_digits 3``); unknown keys are errors. Bad input ends with a
one-line ``transmem: error: ...`` and exit status 2.
"""
from __future__ import annotations

from . import signals as _signals

_STARTUP_SIGNALS = _signals.install_startup()  # SIGINT/SIGTERM while the imports below run: one line

import argparse
import dataclasses
import json
import os
import signal
import sys

import transmem
from .choices import MIX_LR, MIX_STEPS, MIXTURE_FIT_SPLITS, MIXTURE_GATINGS, PROBE_STEPS, TRANSFER_MODES
from .errors import UserError
from .options import TMUOptions, flag as option_flag

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


def _probe_steps(p: argparse.ArgumentParser, what: str = "with 'auto': ") -> None:
    p.add_argument("--probe-steps", type=int, default=PROBE_STEPS,
                   help=f"{what}finetuning steps of the ranking's probe on the target (default {PROBE_STEPS}: "
                        "zero-shot only, which ranked as well on the transfer map; e.g. 50 for a probe)")


#: the ``transfer`` command's flags that are the config's ``transfer.<key>`` (the TMU's options come
#: from their declaration, :class:`transmem.options.TMUOptions`, with its help and values)
TRANSFER_FLAGS = {
    "distill_weight": "lambda of L_distill",
    "init_from": "zoo entry (folder or name under --zoo-root) to initialise the target backbone, or 'auto': "
                 "the best finetune entry by `zoo rank`",
    **{f.name: f.metadata["help"] + (f": one of {', '.join(f.metadata['choices'])}" if f.metadata["choices"] else "")
       for f in dataclasses.fields(TMUOptions)},
}
TRANSFER_FLAGS["mode"] = (TRANSFER_FLAGS["mode"].split(": one of")[0] + "; or mixture: finetune each of --teachers "
                          f"on the target, then learn weights per lead time that combine their forecasts (one zoo "
                          f"entry): one of {', '.join(TRANSFER_MODES)}")
#: the mixture's options (``transfer --mode mixture``, :func:`transmem.api.run_mixture`)
MIXTURE_FLAGS = {
    "baselines": dict(metavar="NAME[,NAME...]", help="registered reference nowcasts that join as members, each "
                                                     "in the scale its name declares (e.g. extrapolation_log)"),
    "gating": dict(choices=MIXTURE_GATINGS, help="weights per lead time (lead, the default), also per pixel, or "
                                                 "stack: the native radar recipe's small CNN over the members' "
                                                 "forecasts, the last frame and the lead"),
    "member_steps": dict(type=int, metavar="N", help="finetuning steps of each member (default train.steps; 0: use the entries "
                                        "as they are, already finetuned on this target)"),
    "mix_steps": dict(type=int, metavar="N", help=f"steps that train the weights (default {MIX_STEPS}; 0: no "
                                                  "training, the members' plain average, --gating lead only)"),
    "mix_lr": dict(type=float, metavar="LR", help=f"learning rate of the weights (default {MIX_LR})"),
    "mix_on": dict(choices=MIXTURE_FIT_SPLITS, help="the clips the weights train on (default val: clips the "
                                                    "members never trained on)"),
    "areas": dict(action="store_true", default=None,
                  help="then keep the forecast inside rain areas calibrated on those clips: per eval.thresholds "
                       "value, the member (or mean of a zoo member and a baseline) and level with the best CSI"),
}


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
    _probe_steps(p)
    p = sub.add_parser("transfer", help="train a TMU target that draws on frozen zoo teachers, or (--mode mixture) "
                                        "a mixture of the zoo entries finetuned on the target")
    _common(p)
    p.add_argument("--teachers", nargs="+",
                   help="zoo entries (folders, or names under --zoo-root), or auto[:K]: the K best teachers "
                        "for this target by `zoo rank` (K = 1 unless given; with --mode mixture: the members, "
                        "the K best entries to finetune)")
    for key, text in TRANSFER_FLAGS.items():  # each the same as --transfer.KEY VALUE (and checked there)
        p.add_argument(option_flag(key), dest=f"transfer.{key}", metavar="VALUE", help=f"{text}; transfer.{key}")
    for key, kw in MIXTURE_FLAGS.items():
        p.add_argument(option_flag(key), dest=f"mixture.{key}", **{**kw, "help": "mixture: " + kw["help"]})
    _probe_steps(p)

    p = sub.add_parser("evaluate", help="per-frame MSE/MAE/SSIM/PSNR of a zoo model or a baseline on a dataset")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", help="zoo entry to evaluate")
    who.add_argument("--baseline",
                     help="a registered reference nowcast instead of a model (persistence, extrapolation, ...; "
                          "see docs/baselines.md)")
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
                        "(see docs/baselines.md)")
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
    _probe_steps(p, "rank: ")
    p.add_argument("--json", help="rank: also write the ranking to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="rank: replace an existing --json file")

    p = sub.add_parser("bench", help="time training steps and inference rollouts")
    p.add_argument("--model", default="convlstm", metavar="MODEL", help="a registered model (`transmem models`)")
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
    if args.cmd in ("demo", "zoo", "predict", "bench", "models") and rest and not zoo_rank:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    overrides = _split_overrides(rest, ap)
    # the transfer command's flags are the config's transfer.KEY (the config checks them)
    overrides.update({k: v for k, v in vars(args).items() if k.startswith("transfer.") and v is not None})
    from .config import ConfigError, load_experiment

    if args.cmd == "demo":
        from .demo import run_demo
        run_demo(args.out, quick=args.quick, mnist_dir=args.mnist, bank_read=not args.no_bank_read)
        return 0

    if args.cmd == "models":
        from .choices import MODEL_KINDS, check
        from .models import list_models
        if args.kind is not None:
            check("--kind", args.kind, MODEL_KINDS, ConfigError)
        print("\n".join(list_models(kind=args.kind)))
        return 0

    if args.cmd == "zoo" and not zoo_rank:
        from .zoo import format_table, read_card, resolve, scan_entries
        if args.action == "list":
            print(format_table(scan_entries(args.root)))
        else:
            if not args.name:
                ap.error("zoo show needs a NAME")
            print(json.dumps(read_card(resolve(args.name, args.root)), indent=2))
        return 0

    if args.cmd == "bench":
        from .bench import BenchSpec, run_bench
        run_bench(BenchSpec.from_args(args), args.mode, args.steps, args.warmup, args.threads, args.json)
        return 0

    if args.cmd == "predict":
        from . import api
        from .predict import run_predict
        run_predict(args.model, args.input, args.out, baselines=api.parse_baselines(args.baselines), fmt=args.format,
                    blend=api.parse_blend(args.blend), native=args.native, leads=args.leads, tile=args.tile)
        return 0

    if args.cmd == "compare":
        from . import api
        metrics = api.compare_runs(args.runs, args.out, args.config, overrides, baselines=args.baselines,
                                   overwrite=args.overwrite, zoo_root=args.zoo_root)
        print(api.format_compare_table(metrics))
        return 0

    if zoo_rank:
        if not args.config:
            ap.error("zoo rank needs --config TARGET.yaml (the target task)")
        if args.name:
            ap.error(f"zoo rank takes no NAME (got {args.name!r}); it ranks every entry under --zoo-root")

    exp = load_experiment(args.config, overrides)  # config errors answer before Lightning is loaded
    from . import api

    if zoo_rank:
        ranking = api.rank_zoo(exp, args.root, args.probe_steps, args.json, args.overwrite)
        print(ranking.format())
        if args.json:
            print(f"wrote {args.json}")
        return 0
    if args.cmd == "data":
        from .data import list_datasets
        if args.action == "list":
            print("\n".join(list_datasets()))
            return 0
        if not args.out:
            ap.error("data export needs --out FILE.npy")
        print(f"wrote {args.out}: {api.export_clips(exp, args.split, args.out)} uint8")
        return 0
    if args.cmd == "pretrain":
        m = api.run_train(exp, args.out, args.resume, zoo_name=args.zoo_name, zoo_root=args.zoo_root)
    elif args.cmd == "finetune":
        m = api.run_train(exp, args.out, args.resume, init_from=args.init_from,
                          zoo_name=args.zoo_name, zoo_root=args.zoo_root, probe_steps=args.probe_steps)
    elif args.cmd == "transfer":
        mix = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("mixture.") and v is not None}
        if exp.transfer.mode == "mixture":
            m = api.run_mixture(exp, args.out, args.resume, teachers=args.teachers, zoo_name=args.zoo_name,
                                zoo_root=args.zoo_root, probe_steps=args.probe_steps, **mix)
        elif mix:
            raise ConfigError(f"{option_flag(next(iter(mix)))}: an option of --mode mixture", where="--mode")
        else:
            m = api.run_transfer(exp, args.out, args.resume, teachers=args.teachers,
                                 zoo_name=args.zoo_name, zoo_root=args.zoo_root, probe_steps=args.probe_steps)
    elif args.cmd == "evaluate":
        m = api.evaluate_to_folder(exp, args.out, model=args.model, baseline=args.baseline, blend=args.blend,
                                   overwrite=args.overwrite)
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


if __name__ == "__main__":
    sys.exit(main())
_signals.restore(_STARTUP_SIGNALS)  # imported, not run: main() installs its own handlers
