"""Tests of transmem.viz (GIFs, grids, plots) and transmem.report_page (Markdown + self-contained HTML)."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from transmem.report_page import build_table, summarize_transfer, write_report
from transmem.viz import plot_per_frame, plot_transfer_maps, save_gif, save_grid, to_uint8_frames


def _seq(t, c=1, h=8, w=8, seed=0):
    return np.random.default_rng(seed).random((t, c, h, w), dtype=np.float32)


def _no_temp_files(folder):
    return not any(p.name.startswith(".") and p.name.endswith(".tmp") for p in folder.iterdir())


# --------------------------------------------------------------------------- frames
def test_to_uint8_frames_scales_and_clips():
    x = np.array([[[[0.0, 1.5], [-1.0, 0.5]]]], dtype=np.float32)  # (T=1, C=1, 2, 2)
    u = to_uint8_frames(x, scale=3)
    assert u.shape == (1, 6, 6, 3) and u.dtype == np.uint8
    assert u[0, 0, 0, 0] == 0 and u[0, 0, 5, 0] == 255 and u[0, 5, 5, 0] == 128
    assert (u[0, :3, :3] == 0).all()  # nearest-neighbour block
    with pytest.raises(ValueError):
        to_uint8_frames(np.zeros((2, 2, 4, 4)))


# --------------------------------------------------------------------------- GIF
def test_save_gif_frames_and_padding(tmp_path):
    inp, gt = _seq(10, seed=1), torch.from_numpy(_seq(5, seed=2))
    pred = _seq(5, c=3, seed=3)
    out = save_gif(tmp_path / "sub" / "pred.gif", [inp, gt, pred], ["input", "truth", "TMU λ=0.1"], fps=5, scale=4)
    assert out.exists() and out.parent.name == "sub"
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 10  # the longest row
        assert im.width >= 3 * 8 * 4 and im.height >= 8 * 4
        assert im.info.get("duration") == 200
    assert _no_temp_files(out.parent)


def test_save_gif_hold_mode_and_single_frame(tmp_path):
    out = save_gif(tmp_path / "one.gif", [_seq(1), _seq(3)], ["a", "b"], pad="hold")
    with Image.open(out) as im:
        assert im.n_frames == 3
    with pytest.raises(ValueError):
        save_gif(tmp_path / "bad.gif", [_seq(2)], ["a", "b"])


# --------------------------------------------------------------------------- grid
def test_save_grid_size(tmp_path):
    h, w, scale, lw = 8, 6, 2, 50
    a = save_grid(tmp_path / "a.png", [_seq(5, h=h, w=w), _seq(3, h=h, w=w)], ["x", "y"], scale=scale, label_width=lw)
    b = save_grid(tmp_path / "b.png", [_seq(8, h=h, w=w)] * 3, ["x", "y", "z"], scale=scale, label_width=lw)
    with Image.open(a) as ia, Image.open(b) as ib:
        assert ia.format == "PNG"
        cw, ch = w * scale, h * scale
        assert ia.width == lw + 2 + 5 * (cw + 2)
        assert ib.width - ia.width == 3 * (cw + 2)  # one column per time step
        assert ib.height - ia.height == ch + 2  # one row per sequence
        # the blank cell of the shorter row is the blank grey
        y0 = ia.height - ch // 2 - 2
        x0 = lw + 2 + 4 * (cw + 2) + cw // 2
        assert ia.convert("RGB").getpixel((x0, y0)) == (225, 225, 225)
    assert _no_temp_files(tmp_path)


# --------------------------------------------------------------------------- plots
def test_plot_per_frame(tmp_path):
    out = plot_per_frame(tmp_path / "mse.png", {"scratch": [3.0, 4.0, 5.0], "tmu": [2.0, None, 4.5]}, "MSE/frame")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (600, 400)


def test_plot_transfer_maps(tmp_path):
    maps = np.random.default_rng(0).random((2, 10, 4, 4))
    out = plot_transfer_maps(tmp_path / "maps.png", maps, ["digits1", "digits2"], "weights")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > im.height
    out2 = plot_transfer_maps(tmp_path / "maps2.png", torch.rand(3, 4), ["a", "b", "c"], "scalars", steps=[0, 3])
    assert out2.exists()
    with pytest.raises(ValueError):
        plot_transfer_maps(tmp_path / "bad.png", maps, ["only one"], "x")


# --------------------------------------------------------------------------- report
def _metrics(mse, ssim, csi=None):
    d = {"mse": mse, "mse_pixel": mse / 64, "mae": mse * 2, "mae_pixel": mse / 32, "ssim": ssim,
         "psnr": 20.0 + ssim, "mse_per_frame": [mse] * 3, "count": 8}
    if csi is not None:
        d["csi"] = {"0.5": {"per_frame": [csi] * 3, "mean": csi}}
    return d


def test_write_report(tmp_path):
    save_gif(tmp_path / "pred.gif", [_seq(4), _seq(4, seed=5)], ["truth", "pred"])
    plot_per_frame(tmp_path / "plots" / "mse.png", {"a": [1.0, 2.0]}, "MSE")
    table = {
        "scratch": _metrics(40.3, 0.61, csi=0.30),
        "finetune": _metrics(38.7, 0.66, csi=None),
        "tmu | ft": _metrics(38.8, 0.66, csi=0.41),
    }
    images = [("Predictions", "pred.gif"), ("MSE per frame", "plots/mse.png")]
    md_path, html_path = write_report(tmp_path, "Demo <run>", table, images, notes=["note one", "note two"],
                                      settings={"lr": 0.001, "hidden": [16, 16]})
    assert md_path.exists() and html_path.exists()
    md = md_path.read_text(encoding="utf-8")
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    assert len(rows) == 3
    assert "**38.7**" in md and "**0.6600**" in md and "**0.4100**" in md  # best MSE, tied SSIM, CSI
    assert md.count("**0.6600**") == 2  # both tied SSIM values bold
    assert "40.3" in md and "**40.3**" not in md
    assert "CSI ≥ 0.5" in md and "](plots/mse.png)" in md and "](pred.gif)" in md
    assert "tmu \\| ft" in md  # pipes escaped in Markdown cells

    page = html_path.read_text(encoding="utf-8")
    assert "Demo &lt;run&gt;" in page and "<b>38.7</b>" in page
    uris = re.findall(r'src="data:(image/[a-z]+);base64,([A-Za-z0-9+/=]+)"', page)
    assert [m for m, _ in uris] == ["image/gif", "image/png"]
    for _, data in uris:
        with Image.open(io.BytesIO(base64.b64decode(data))) as im:
            im.load()
    assert 'src="pred.gif"' not in page and "lr" in page and "note two" in page
    assert page.count("<tr>") >= 1 + 3  # header + one row per method (+ settings rows)


def test_report_missing_image_warns(tmp_path):
    with pytest.warns(UserWarning):
        _, html_path = write_report(tmp_path, "t", {"a": _metrics(1.0, 0.5)}, [("gone", "nope.png")], notes="x")
    assert "image missing" in html_path.read_text(encoding="utf-8")


def test_build_table_extras_and_none():
    headers, cells, bold = build_table({"a": {"mse": 2.0, "ssim": None, "steps": 500},
                                        "b": {"mse": 1.0, "ssim": 0.5, "steps": 800}})
    assert headers == ["Method", "MSE/frame", "SSIM", "steps"]
    assert cells[0] == ["a", "2", "\u2013", "500"]
    assert bold[1] == [False, True, True, False]  # no best marked for unknown columns


def test_summarize_transfer():
    w = np.stack([np.linspace(0.8, 0.3, 10), np.linspace(0.2, 0.7, 10)])
    line = summarize_transfer(w, ["digits2", "digits1"])
    assert line.startswith("source 'digits2' dominates (mean weight 0.55)")
    assert "strongest at lead times 1-6" in line and "'digits1' leads at 7-10" in line
    assert "\n" not in line
    maps = np.zeros((2, 4, 3, 3))
    maps[1] = 1.0
    assert "source 'b' dominates (mean weight 1.00), strongest at lead times 1-4" == summarize_transfer(maps, ["a", "b"])
    assert "single source" in summarize_transfer(np.ones((1, 3)), ["only"])


def test_summarize_transfer_step_label():
    w = np.array([[0.9, 0.1, 0.9], [0.1, 0.9, 0.1]])
    line = summarize_transfer(w, ["a", "b"], step_label="steps", first_step=0)
    assert line == "source 'a' dominates (mean weight 0.63), strongest at steps 0, 2; 'b' leads at 1"
