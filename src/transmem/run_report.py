"""The report of a run: per-frame metric plots, GIFs and grids of forecasts, TMU transfer maps, and
the page (report.md / report.html, written by :mod:`transmem.report_page`). It takes forecasters
already loaded -- anything with ``rollout(frames)`` and ``t_in`` -- and draws; it loads nothing.
Used by ``demo``, ``evaluate`` and the benchmarks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .report_page import summarize_transfer, write_report
from .training import ForecastModule, make_loader, predict_batches
from .viz import plot_per_frame, plot_transfer_maps, save_gif, save_grid


@torch.inference_mode()
def transfer_maps(module, dataset, batch_size: int = 16, max_clips: int = 64) -> dict:
    """Average TMU gate and source-weight maps over test clips.

    Returns {layer: {"gate": (N, T-1, h, w), "weight": (N, T-1, h, w) or None,
    "transfer": (N, T-1, h, w)}} where ``gate`` is the transfer gate averaged over channels,
    ``weight`` the softmax weight across sources (sums to 1 over N at each position and step) and
    ``transfer`` their product, the share of each source that enters the memory."""
    model = module.model
    sums: dict = {}
    seen = 0
    for batch in make_loader(dataset, batch_size, False):
        frames = batch["frames"]
        bank = None
        if model.needs_teachers_at_inference:
            bank = module.bank.rollout(frames, module.t_in)
        _, aux = model(frames, t_in=module.t_in, bank=bank, return_aux=True, record_maps=True)
        for layer, steps in aux["maps"].items():
            gate = torch.stack([s["gate"] for s in steps], 2).sum(0)  # (N, T-1, h, w)
            weight = None if steps[0]["weight"] is None else torch.stack([s["weight"] for s in steps], 2).sum(0)
            acc = sums.setdefault(layer, {"gate": 0, "weight": 0 if weight is not None else None})
            acc["gate"] = acc["gate"] + gate
            if weight is not None:
                acc["weight"] = acc["weight"] + weight
        seen += frames.shape[0]
        if seen >= max_clips:
            break
    out = {}
    for layer, acc in sums.items():
        gate = (acc["gate"] / seen).numpy()
        weight = None if acc["weight"] is None else (acc["weight"] / seen).numpy()
        out[layer] = {"gate": gate, "weight": weight,
                      "transfer": gate * weight if weight is not None else gate}
    return out


def forecasts(module, dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(frames (n, T, C, H, W), forecast (n, T_out, C, H, W)) for the first n test clips."""
    frames, preds = [], []
    for f, _, p in predict_batches(module, dataset, batch_size=n, limit=n):
        frames.append(f[:n])
        preds.append(p[:n].clamp(0, 1))
        break
    return torch.cat(frames).numpy(), torch.cat(preds).numpy()


def method_report(out: Path, title: str, methods: dict, forecasters: dict, dataset, t_in: int,
                  examples: int = 3, settings: dict | None = None, notes=None) -> tuple[Path, Path]:
    """Plots, GIFs, grids, transfer maps and the report for a set of methods evaluated on one
    dataset. ``methods`` maps method -> metrics; ``forecasters`` maps method -> a loaded
    forecaster (a ForecastModule or a baseline) whose forecasts and TMU maps are drawn."""
    out = Path(out)
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for key, label in (("mse_per_frame", "MSE per frame"), ("ssim_per_frame", "SSIM"),
                       ("psnr_per_frame", "PSNR (dB)")):
        series = {m: v[key] for m, v in methods.items() if key in v}
        if series:
            p = plot_per_frame(fig_dir / f"{key}.png", series, label)
            images.append((f"{label} per lead time", str(p.relative_to(out))))
    notes = list(notes or [])
    preds = {}
    frames = None
    for name, module in forecasters.items():
        module.t_in = t_in
        if examples > 0:  # eval.examples: 0 draws no clip (and rolls none out)
            frames, preds[name] = forecasts(module, dataset, examples)
        if isinstance(module, ForecastModule) and module.model.model_kind == "transfer":  # its transfer maps
            maps = transfer_maps(module, dataset)
            names = module.model.config.source_names
            for layer, m in maps.items():
                safe = name.replace(":", "-").replace("+", "-")
                lead = m["transfer"][:, t_in - 1:]  # steps that produce the forecast: lead times 1..T_out
                p = plot_transfer_maps(fig_dir / f"transfer_{safe}_layer{layer}.png", lead, names,
                                       f"{name}: transfer weight per source and lead time (layer {layer})")
                images.append((f"{name}: transfer maps, layer {layer}", str(p.relative_to(out))))
                np.savez(fig_dir / f"transfer_{safe}_layer{layer}.npz",
                         **{k: v for k, v in m.items() if v is not None})
                notes.append(f"{name}, layer {layer}: {summarize_transfer(lead, names)}")
    if frames is not None:
        for i in range(min(examples, frames.shape[0])):
            rows = [frames[i, :t_in], frames[i, t_in:]] + [preds[m][i] for m in preds]
            labels = ["input", "truth"] + list(preds)
            g = save_gif(fig_dir / f"example{i}.gif", rows, labels)
            images.append((f"test clip {i}: input | truth | forecasts", str(g.relative_to(out))))
            rows_grid = [frames[i, t_in:]] + [preds[m][i] for m in preds]
            p = save_grid(fig_dir / f"example{i}.png", rows_grid, ["truth"] + list(preds))
            images.append((f"test clip {i}: forecast grid", str(p.relative_to(out))))
    table = {m: {k: v for k, v in d.items() if not isinstance(v, list) and k != "contingency"}
             for m, d in methods.items()}
    return write_report(out, title, table, images, notes, settings)


def demo_report(out: Path, result: dict, forecasters: dict, test_set, t_in: int) -> None:
    notes = [
        "MSE/frame is the squared error summed over the pixels of a frame (PredRNN convention), "
        "averaged over test clips and lead times; MSE/pixel is the per-pixel mean.",
        "One seed and a small budget: differences between rows are indicative, not established. "
        "See benchmarks/ for the seeded comparison.",
    ]
    method_report(out, "transmem demo: transfer to 3-digit flying digits", result["methods"],
                  forecasters, test_set, t_in,
                  settings=result["settings"], notes=notes)
