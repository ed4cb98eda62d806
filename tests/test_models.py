"""Backbone protocol: shapes, memories, patching, sampling masks, registry; the cell equations
on the fused-kernel and the plain path (the kernels' switch)."""
import os
import subprocess
import sys

import pytest
import torch

from transmem.choices import MODEL_KINDS
from transmem.models import create_model, get_model_class, kernels, list_models, patchify, unpatchify
from transmem.models.base import conv1x1, gated_tanh, lstm_memory, teacher_forcing_mask

from backbones import BACKBONES, small  # every registered backbone, and a small one of each


def test_registry_lists_backbones_and_tmu():
    assert {"convlstm", "predrnn", "tmu"} <= set(list_models())
    backbones, transfer = list_models(kind="backbone"), list_models(kind="transfer")
    assert {"convlstm", "predrnn"} <= set(backbones) and "tmu" not in backbones
    assert "tmu" in transfer and not {"convlstm", "predrnn"} & set(transfer)
    assert sorted(n for k in MODEL_KINDS for n in list_models(kind=k)) == list_models()  # exactly one kind each
    assert get_model_class("tmu").model_kind == "transfer"
    assert get_model_class("predrnn").model_kind == "backbone"
    with pytest.raises(ValueError, match="model kind: expected one of backbone, transfer"):
        list_models(kind="teacher")
    with pytest.raises(KeyError, match="unknown model"):
        create_model("nope")
    with pytest.raises(ValueError, match="unknown convlstm config keys"):
        create_model("convlstm", hiddden=3)


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
def test_shapes_and_memory(name, size):
    torch.manual_seed(0)
    m = small(name)
    x = torch.rand(2, 7, 1, *size)
    y, mem = m(x, t_in=3, return_memory=True)
    assert y.shape == (2, 6, 1, *size)
    assert len(mem) == 2
    for l in range(2):
        assert mem[l].shape == (2, 6, 8, size[0] // 4, size[1] // 4)
    # the same weights run at another frame size: no norm fixes the spatial size
    y2 = m(torch.rand(1, 5, 1, 8, 12), t_in=2)
    assert y2.shape == (1, 4, 1, 8, 12)


@pytest.mark.parametrize("name", BACKBONES)
def test_group_norm_and_rgb(name):
    m = small(name, norm="group", in_channels=3, patch_size=2)
    y = m(torch.rand(2, 4, 3, 8, 8), t_in=2)
    assert y.shape == (2, 3, 3, 8, 8)


def test_patchify_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 2 * 8 * 12, dtype=torch.float32).reshape(2, 3, 2, 8, 12)
    p = patchify(x, 4)
    assert p.shape == (2, 3, 2 * 16, 2, 3)
    assert torch.equal(unpatchify(p, 4), x)
    # channel c*16 + i*4 + j of grid cell (a, b) is pixel (4a+i, 4b+j) of channel c
    assert p[0, 0, 1 * 16 + 2 * 4 + 3, 1, 2] == x[0, 0, 1, 4 + 2, 8 + 3]


def test_bad_frames_are_refused():
    m = small("convlstm")
    with pytest.raises(ValueError, match="not divisible by patch size"):
        m(torch.rand(1, 4, 1, 10, 16))
    with pytest.raises(ValueError, match="channels"):
        m(torch.rand(1, 4, 3, 16, 16))


@pytest.mark.parametrize("name", BACKBONES)
def test_sampling_mask_controls_inputs(name):
    """Future frames are ignored where the mask is 0 and read where it is 1."""
    torch.manual_seed(0)
    m = small(name).eval()
    x = torch.rand(2, 6, 1, 16, 16)
    x2 = x.clone()
    x2[:, 3:] = torch.rand(2, 3, 1, 16, 16)
    with torch.no_grad():
        a, b = m(x, t_in=3), m(x2, t_in=3)
        assert torch.allclose(a, b)  # frames after t_in never read in a rollout
        mask = teacher_forcing_mask(2, 5, None)
        c, d = m(x, mask), m(x2, mask)
        assert not torch.allclose(c[:, 3:], d[:, 3:])  # read when teacher-forced
        assert torch.allclose(c[:, :3], d[:, :3])
        # per-sequence masks: sequence 0 teacher-forced, sequence 1 rolled out
        mixed = torch.stack([torch.ones(5), teacher_forcing_mask(1, 5, 3)[0]])
        e = m(x2, mixed)
        assert torch.allclose(e[0], d[0], atol=1e-6) and torch.allclose(e[1], b[1], atol=1e-6)


@pytest.mark.parametrize("name", BACKBONES)
def test_memory_hook_changes_the_carried_memory(name):
    torch.manual_seed(0)
    m = small(name).eval()
    x = torch.rand(1, 5, 1, 16, 16)
    calls = []

    def hook(layer, t, mem, x_in, h_prev, xh=None):
        calls.append((layer, t, tuple(mem.shape), x_in.shape[1], h_prev.shape[1]))
        return mem * 0 if layer == 1 else mem

    with torch.no_grad():
        base, mem0 = m(x, t_in=2, return_memory=True)
        out, mem1 = m(x, t_in=2, return_memory=True, memory_hook=hook)
    assert len(calls) == 2 * 4
    assert calls[0] == (0, 0, (1, 8, 4, 4), 16, 8) and calls[1][:2] == (1, 0)
    assert torch.count_nonzero(mem1[1]) == 0 and torch.allclose(mem1[0][:, 0], mem0[0][:, 0])
    assert not torch.allclose(out, base)


@pytest.mark.parametrize("name", BACKBONES)
def test_gradients_reach_every_parameter(name):
    m = small(name)
    x = torch.rand(2, 5, 1, 16, 16)
    y = m(x)
    ((y - x[:, 1:]) ** 2).mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", BACKBONES)
def test_a_backbone_needs_no_teachers_at_inference(name):
    assert small(name).needs_teachers_at_inference is False


def test_kernel_switch_default_setter_context_and_env_var():
    assert kernels.enabled()  # on by default (the test run does not set TRANSMEM_FUSED)
    with kernels.use_fused(False):
        assert not kernels.enabled()
        with kernels.use_fused(True):
            assert kernels.enabled()
        assert not kernels.enabled()
    assert kernels.enabled()
    with pytest.raises(RuntimeError):
        with kernels.use_fused(False):
            raise RuntimeError("restored even on an error")
    assert kernels.enabled()
    assert kernels.set_enabled(False) is True and kernels.set_enabled(True) is False
    assert [kernels._from_env(v) for v in (None, "1", "0", "false", "OFF", "no", "yes")] == \
        [True, True, False, False, False, False, True]
    env = {**os.environ, "TRANSMEM_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", "from transmem.models import kernels; print(kernels.enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_fused_and_plain_paths_agree(name, monkeypatch):
    """The same rollout with the kernels' switch on and off: the same predictions and gradients
    (up to float rounding), and the switch decides which path runs."""
    torch.manual_seed(0)
    m = small(name)
    x = torch.rand(2, 5, 1, 16, 16)
    calls = []
    for fn in ("lstm_memory", "gated_tanh", "pointwise_conv"):
        real = getattr(kernels, fn)
        monkeypatch.setattr(kernels, fn, lambda *a, _f=real, _n=fn: calls.append(_n) or _f(*a))

    def run():
        m.zero_grad(set_to_none=True)
        y = m(x, t_in=3)
        ((y - x[:, 1:]) ** 2).mean().backward()
        return y.detach(), [p.grad.clone() for p in m.parameters()]

    with kernels.use_fused(True):
        fused = run()
    assert {"lstm_memory", "gated_tanh", "pointwise_conv"} <= set(calls)
    calls.clear()
    with kernels.use_fused(False):
        plain = run()
    assert calls == []
    assert torch.allclose(fused[0], plain[0], atol=1e-6)
    for a, b in zip(fused[1], plain[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_o", [True, False])
@pytest.mark.parametrize("first", [True, False])
def test_lstm_memory_matches_its_formula_and_passes_gradcheck(with_o, first, fused):
    torch.manual_seed(0)
    hd = 3
    pre = torch.randn(2, (4 if with_o else 3) * hd, 4, 5, dtype=torch.double, requires_grad=True)
    c_prev = None if first else torch.randn(2, hd, 4, 5, dtype=torch.double, requires_grad=True)
    inputs = (pre,) if first else (pre, c_prev)
    fn = (lambda *a: lstm_memory(a[0], None if first else a[1], with_o))
    with kernels.use_fused(fused):
        out = lstm_memory(pre, c_prev, with_o)
        c = out[0] if with_o else out
        # the switch selects the path: one fused node, or plain autograd ops
        assert (type(c.grad_fn).__name__ == "LSTMMemoryFnBackward") == fused
        want = torch.sigmoid(pre[:, :hd]) * torch.tanh(pre[:, 2 * hd: 3 * hd])
        if not first:
            want = want + torch.sigmoid(pre[:, hd: 2 * hd]) * c_prev
        assert torch.allclose(c, want, atol=1e-12)
        if with_o:
            assert torch.allclose(out[1], torch.sigmoid(pre[:, 3 * hd:]))
        assert torch.autograd.gradcheck(fn, inputs)
        if first:  # the forget gate reads a zero memory: its pre-activation gets no gradient
            out_c = lstm_memory(pre, None, with_o)
            (out_c[0] if with_o else out_c).sum().backward()
            assert pre.grad[:, hd: 2 * hd].abs().max() == 0
            assert pre.grad[:, :hd].abs().max() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_gated_tanh_and_conv1x1_match_torch(fused):
    torch.manual_seed(0)
    o = torch.rand(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    c = torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True)
    x = torch.randn(2, 5, 3, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(6, 5, 1, 1, dtype=torch.double, requires_grad=True)
    b = torch.randn(6, dtype=torch.double, requires_grad=True)
    with kernels.use_fused(fused):
        assert torch.allclose(gated_tanh(o, c), o * torch.tanh(c))
        assert torch.autograd.gradcheck(gated_tanh, (o, c))
        assert torch.allclose(conv1x1(x, w, b), torch.nn.functional.conv2d(x, w, b))
        assert torch.autograd.gradcheck(conv1x1, (x, w, b))
    # the kernels themselves, whatever the switch says
    assert torch.allclose(kernels.gated_tanh(o, c), o * torch.tanh(c))
    assert torch.autograd.gradcheck(kernels.gated_tanh, (o, c))
    assert torch.allclose(kernels.pointwise_conv(x, w, b), torch.nn.functional.conv2d(x, w, b))
    assert torch.autograd.gradcheck(kernels.pointwise_conv, (x, w, b))
