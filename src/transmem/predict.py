"""`transmem predict`: forecast the frames that follow a file or folder of frames.

Reads the input with the same readers as training (video, GIF, frame folder, .npy/.npz, radar),
resizes it to the model's frame size, takes the last T_in frames and writes the T_out predicted
frames as PNGs, an ``.npy`` and a GIF (input | prediction). Radar models also get the forecast in
mm/h. With ``--baselines`` the persistence and extrapolation forecasts of the same input are written
beside it. Everything is written to a temporary folder first, so a failure leaves nothing partial.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .api import RunFolderError, load_for_inference
from .baselines import BASELINES, BaselineUnavailable, create_baseline
from .data import DataError, physical_units
from .data.inputs import read_input_frames
from .files import atomic_folder
from .viz import save_gif


def run_predict(model_ref, input_path, out_dir, baselines: bool = False) -> Path:
    """``baselines``: also write the persistence and extrapolation forecasts of the same input
    (``baseline_<name>.npy``, and as rows of the GIF), for scale; extrapolation is left out, with
    a line saying so, when its extra is not installed."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunFolderError(f"{out}: output folder exists and is not empty; choose another --out")
    module, card = load_for_inference(model_ref)
    t_in, t_out = int(card["t_in"]), int(card["t_out"])
    size = int(card["frame_size"][0])
    channels = int(card.get("channels", 1))
    data = card.get("data", {})
    extra = data.get("extra") or {}
    opts = {"r_max": float(extra["r_max"])} if "r_max" in extra else {}
    frames = read_input_frames(input_path, channels=channels, size=size, **opts)
    if frames.shape[0] < t_in:
        raise DataError(input_path, f"has {frames.shape[0]} frames; the model needs at least T_in={t_in}")
    past = torch.from_numpy(np.ascontiguousarray(frames[-t_in:]))[None]
    clip = torch.cat([past, past.new_zeros(1, t_out, *past.shape[2:])], 1)
    with torch.inference_mode():
        pred = module.rollout(clip)[0].clamp(0, 1).numpy()  # (T_out, C, H, W)
    units = physical_units(data) if data.get("name") else None
    others = {}
    for name in BASELINES if baselines else ():
        try:
            b = create_baseline(name, t_in, *((units.to_physical, units.from_physical) if units else ()))
        except BaselineUnavailable as e:
            print(f"baseline {name} left out: {e}")
            continue
        others[name] = b.rollout(clip)[0].numpy()
    with atomic_folder(out) as tmp:
        np.save(tmp / "prediction.npy", pred.astype(np.float32))
        if units is not None:
            np.save(tmp / f"prediction_{units.name.replace('/', '')}.npy",
                    np.asarray(units.to_physical(pred), dtype=np.float32))
        for k, f in enumerate(pred, 1):
            img = (f.transpose(1, 2, 0) * 255).round().astype(np.uint8)
            Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(tmp / f"frame_{k:02d}.png")
        for name, f in others.items():
            np.save(tmp / f"baseline_{name}.npy", f.astype(np.float32))
        save_gif(tmp / "prediction.gif", [past[0].numpy(), pred, *others.values()],
                 ["input", "prediction", *others])
    print(f"wrote {t_out} predicted frames to {out} (frames, prediction.npy, prediction.gif)")
    return out
