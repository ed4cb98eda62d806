"""The mixture of finetuned zoo members (``transfer --mode mixture``): its options, the checks a
member must pass before anything is trained, and the one builder of the model, so that the API
and the benchmarks assemble it the same way. The model is :class:`transmem.models.mixture.MixtureModel`."""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..baselines import baseline_for_data, list_baselines
from ..choices import MIX_LR, MIX_STEPS, MIXTURE_FIT_SPLITS, MIXTURE_GATINGS
from ..config import ConfigError
from ..models import create_model, get_model_class
from ..models.mixture import MixtureModel, area_source, patch_lcm


class MixtureError(ConfigError):
    """A member that cannot join the mixture, or a bad mixture option (one-line message)."""


@dataclass
class MixtureOptions:
    """What ``transfer --mode mixture`` takes besides the config. ``member_steps``: finetuning
    steps of each member on the target (None: ``train.steps``; 0: the entries are used as they
    are, already finetuned on this target). ``mix_steps`` / ``mix_lr``: the training of the
    weights (Adam on the logits: a larger step than a network's); ``mix_steps`` 0 (``lead``
    gating only): no training, the members' plain average, for members of similar skill (fit
    weights find a member much better than the others; equal ones cannot). ``mix_on``: the clips they
    train on -- ``val`` (default), which the members never trained on, so that a member that
    fits its training clips best but forecasts worse does not win weight (as in stacking); or
    ``train``, when there are too few validation clips. ``areas``: after the weights, calibrate
    rain areas on the same clips (:func:`calibrate_areas`; needs ``eval.thresholds``)."""

    baselines: list = field(default_factory=list)
    gating: str = "lead"
    member_steps: int | None = None
    mix_steps: int = MIX_STEPS
    mix_lr: float = MIX_LR
    mix_on: str = "val"
    areas: bool = False

    def check(self) -> "MixtureOptions":
        """Every option, before anything is built: a one-line :class:`MixtureError` naming it."""
        if isinstance(self.baselines, str):
            self.baselines = [b.strip() for b in self.baselines.split(",") if b.strip()]
        self.baselines = list(self.baselines or [])
        known = list_baselines()
        for name in self.baselines:
            if name not in known:
                raise MixtureError(f"--baselines: unknown baseline {name!r}; choose from {', '.join(known)}")
        if len(set(self.baselines)) != len(self.baselines):
            raise MixtureError(f"--baselines {','.join(self.baselines)}: a baseline is named twice")
        if self.mix_on not in MIXTURE_FIT_SPLITS:
            raise MixtureError(f"--mix-on {self.mix_on!r}: choose from {', '.join(MIXTURE_FIT_SPLITS)}")
        if self.gating not in MIXTURE_GATINGS:
            raise MixtureError(f"--gating {self.gating!r}: choose from {', '.join(MIXTURE_GATINGS)}")
        if not isinstance(self.areas, bool):
            raise MixtureError(f"--areas {self.areas!r}: on or off")
        for key in ("member_steps", "mix_steps"):
            v = getattr(self, key)
            if v is None and key == "member_steps":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MixtureError(f"--{key.replace('_', '-')} {v!r}: must be an integer >= 0")
        if self.mix_steps == 0 and self.gating != "lead":
            raise MixtureError(f"--mix-steps 0 (the members' plain average) with --gating {self.gating}: the "
                               f"{self.gating} gate must be trained; use --gating lead, or --mix-steps >= 1")
        if isinstance(self.mix_lr, bool) or not isinstance(self.mix_lr, (int, float)) or not 0 < self.mix_lr <= 10:
            raise MixtureError(f"--mix-lr {self.mix_lr!r}: must be a number in (0, 10]")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, was: dict) -> list[str]:
        """What differs from the options ``was`` of an earlier run (for ``--resume``); an option
        that run's file predates counts as its default."""
        default = MixtureOptions().to_dict()
        was = {**default, **was}
        return [f"{k} ({was.get(k)!r} there, {v!r} now)" for k, v in self.to_dict().items() if was.get(k) != v]

    @classmethod
    def from_dict(cls, d: dict) -> "MixtureOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_one_process(train) -> None:
    """The members train one after another and the weights after them, in one process: a
    multi-process launch (``train.devices``, ``train.num_nodes``) is refused before anything runs."""
    dev = train.devices
    if train.num_nodes != 1 or not (dev in (1, "1") or (isinstance(dev, list) and len(dev) == 1)):
        raise MixtureError(f"train.devices={dev!r}, train.num_nodes={train.num_nodes}: the mixture trains its "
                           "members one after another in one process; set train.devices 1 and train.num_nodes 1")


def check_count(members: int, baselines) -> None:
    """A mixture combines at least two forecasters, one of them a zoo member."""
    if members < 1 or members + len(baselines) < 2:
        raise MixtureError(f"a mixture needs at least two members, one of them a zoo entry; got {members} zoo "
                           f"entries and {len(baselines)} baselines (--teachers, --baselines)")


def check_baselines(names, t_in: int, data) -> None:
    """Each baseline member can run for this data (its extra installed, enough input frames):
    :class:`~transmem.baselines.BaselineUnavailable` or a :class:`MixtureError`, before anything is trained."""
    for name in names:
        try:
            baseline_for_data(name, t_in, data)
        except ValueError as e:
            raise MixtureError(f"--baselines {name}: {' '.join(str(e).split())}") from None


def check_member(ref, card: dict, channels: int) -> None:
    """A member is a backbone (by the model registry's kind) reading the target's channels; the
    message names the entry ``ref``."""
    try:
        kind = get_model_class(card["model"]).model_kind
    except KeyError:
        raise MixtureError(f"{ref}: its model '{card['model']}' is not a registered model") from None
    if kind != "backbone":
        raise MixtureError(f"{ref}: a '{card['model']}' model ({kind}), not a backbone: a mixture's members "
                           "are backbone entries, finetuned on the target")
    have = (card.get("config") or {}).get("in_channels", card.get("channels"))
    if have is not None and have != channels:
        raise MixtureError(f"{ref}: reads {have}-channel frames, the target has data.channels={channels}")


def fit_clips(datasets: dict, opts: MixtureOptions):
    """The clips the weights train on (``opts.mix_on``); a one-line :class:`MixtureError` when there are none."""
    clips = datasets.get(opts.mix_on)
    if clips is None or len(clips) == 0:
        raise MixtureError(f"--mix-on {opts.mix_on}: the data has no {opts.mix_on} clips to train the mixture's "
                           f"weights on (data.{opts.mix_on}_clips, data.split, or --mix-on "
                           f"{'train' if opts.mix_on == 'val' else 'val'})")
    return clips


def member_card(name: str, entry, card: dict, finetuned: dict | None = None) -> dict:
    """What the mixture's card says of a member: its name, the entry it came from, and the sha256
    of the weights it holds (the finetuned ones, when ``finetuned`` describes that run)."""
    return {"name": name, "entry": str(entry), "sha256": card["sha256"], "model": card["model"],
            **({"finetuned": finetuned} if finetuned else {})}


def unique_names(names: list[str]) -> list[str]:
    """Member names made unique (two entries of one name in other folders get ``-2``, ``-3``)."""
    out: list[str] = []
    for n in names:
        m, k = n, 2
        while m in out:
            m, k = f"{n}-{k}", k + 1
        out.append(m)
    return out


#: what the baseline members read of the data config (units, inflow, grid spacing): counts such as
#: data.seed or train_clips stay off the card's model config, whose numbers the card check bounds
BASELINE_DATA_KEYS = ("name", "path", "frames", "size", "channels", "resize", "extra")


def build_mixture(members: list, names: list[str], *, baselines=(), data: dict | None = None, t_in: int,
                  leads: int, channels: int = 1, gating: str = "lead", gate_kernel: int = 3,
                  seed: int | None = None) -> MixtureModel:
    """A :class:`MixtureModel` holding copies of the (loaded, frozen) backbone ``members``, with
    ``baselines`` (registered names, each in its declared scale through ``data``'s units) as
    further members and uniform weights to start. ``seed``: anything random in the combination is drawn right after
    seeding with it."""
    if len(members) != len(names):
        raise MixtureError("a mixture needs one name per member")
    spec = [{"model": m.model_name, "config": asdict(m.config)} for m in members]
    if seed is not None:
        torch.manual_seed(seed)
    kept = {k: v for k, v in (data or {}).items() if k in BASELINE_DATA_KEYS} if baselines else {}
    model = create_model("mixture", members=spec, member_names=list(names), baselines=list(baselines),
                         baseline_data=kept, baseline_scale="own", t_in=int(t_in), leads=int(leads),
                         gating=gating, gate_kernel=gate_kernel, channels=int(channels),
                         patch_size=patch_lcm([m.config.patch_size for m in members]))
    for dst, src in zip(model.members, members):
        dst.load_state_dict(src.state_dict())
    return model.eval()


# ------------------------------------------------------------------------------ calibrated areas
#: the levels a rain area may be drawn at, as factors of its threshold (0.5 ... 1.4 mm/h for 1 mm/h)
AREA_FACTORS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)


def area_candidates(names: list[str], zoo_members: int) -> list[str]:
    """The fields an area may be drawn from: every member, and the equal mean of each zoo member
    with each baseline member (:func:`transmem.models.mixture.area_source` reads them)."""
    return list(names) + [f"mean:{a}+{b}" for a in names[:zoo_members] for b in names[zoo_members:]]


def count_areas(fields: dict, obs, valid, levels: dict, to_value, counts: dict | None = None) -> dict:
    """Contingency counts of candidate rain areas, added to ``counts``: ``{"source|threshold|level":
    [hits, misses, false alarms]}``. ``fields``: source name -> forecast; ``obs``, ``valid``: the
    observed values and where they count (arrays or tensors of one shape, the model's values);
    ``levels``: threshold -> the levels to draw its area at, both physical (e.g. mm/h);
    ``to_value``: physical -> the model's values (monotone)."""
    counts = {} if counts is None else counts
    for t, candidates in levels.items():
        seen = (obs >= float(to_value(t))) & valid
        for name, forecast in fields.items():
            for level in candidates:
                drawn = (forecast >= float(to_value(level))) & valid
                c = counts.setdefault(f"{name}|{t}|{level}", [0, 0, 0])
                c[0] += int((drawn & seen).sum())
                c[1] += int((~drawn & seen).sum())
                c[2] += int((drawn & ~seen).sum())
    return counts


def pick_areas(groups: list[dict]) -> dict:
    """``{threshold: (source, level)}``: per threshold, the candidate of :func:`count_areas` with the
    best mean CSI over ``groups`` (counts of separate events, or one pooled count)."""
    def csi(c):
        return c[0] / sum(c) if sum(c) else 0.0
    keys = list(groups[0])
    picks = {}
    for t in dict.fromkeys(k.split("|")[1] for k in keys):
        best = max((k for k in keys if k.split("|")[1] == t),
                   key=lambda k: sum(csi(g[k]) for g in groups) / len(groups))
        picks[float(t)] = (best.split("|")[0], float(best.split("|")[2]))
    return picks


def check_area_thresholds(thresholds) -> None:
    """``--areas`` needs the thresholds it calibrates at: a one-line :class:`MixtureError` before
    anything is trained when there are none."""
    if not thresholds:
        raise MixtureError("--areas: the rain areas are calibrated at eval.thresholds, and the config has none "
                           "(set eval.thresholds, e.g. [1.0, 5.0] mm/h)")


def calibrate_areas(model: MixtureModel, clips, units, thresholds, zoo_members: int, batch_size: int = 8,
                    factors=AREA_FACTORS) -> list[dict]:
    """The rain areas a trained mixture keeps its forecast inside (``config.areas``): for each
    threshold (physical, ``units`` maps them to the values; None: the values themselves), the
    field and level (threshold x ``factors``) whose areas have the best CSI over ``clips``, all
    leads pooled, no-data (``mask``) left out. The weights do not change."""
    from torch.utils.data import DataLoader
    check_area_thresholds(thresholds)

    def to_value(x):
        return float(np.asarray(units.from_physical(np.asarray(x, dtype=np.float64)))) if units else float(x)
    levels = {float(t): [round(float(t) * f, 6) for f in factors] for t in sorted(thresholds)}
    names, t_in = model.names, model.config.t_in
    sources = area_candidates(names, zoo_members)
    counts: dict = {}
    model.eval()
    with torch.inference_mode():
        for batch in DataLoader(clips, batch_size=batch_size, shuffle=False):
            frames = batch["frames"].float()
            fc = model.member_forecasts(frames)[1]
            obs = frames[:, t_in:]
            mask = batch.get("mask")
            valid = torch.ones_like(obs, dtype=torch.bool) if mask is None else mask[:, t_in:].bool()
            count_areas({s: area_source(fc, names, s) for s in sources}, obs, valid, levels, to_value, counts)
    picks = pick_areas([counts])
    out = []
    for t, (src, level) in sorted(picks.items()):
        c = counts[f"{src}|{t}|{level}"]
        out.append({"threshold": t, "value": to_value(t), "source": src, "level": level,
                    "level_value": to_value(level), "csi": round(c[0] / sum(c), 4) if sum(c) else 0.0})
    return out
