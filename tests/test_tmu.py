"""The TMU and the memory bank: distillation gradients, teachers frozen, N = 1..3 teachers,
bottom/all layers, both backbones, heterogeneous teachers, distill-mode independence from the
teachers, cache equivalence, clear errors; the fused TMU kernel against the plain path (the
kernels' switch) and the [x, h] the backbone hands to the TMU."""
import copy

import pytest
import torch

from backbones import BACKBONES
from transmem.models import create_model, kernels
from transmem.training import ForecastModule, SamplingSchedule
from transmem.transfer import BankCache, MemoryBank, TeacherMismatch

T = 6
SIZE = 16


def teacher(name="convlstm", **kw):
    cfg = dict(num_layers=2, hidden=8, filter_size=3, patch_size=4)
    cfg.update(kw)
    torch.manual_seed(len(kw) + len(name))
    return create_model(name, **cfg).eval()


def build(backbone="convlstm", teachers=None, layers="bottom", mode="distill", inputs="ground_truth",
          weighting="none", gates=True, **bb):
    teachers = teachers if teachers is not None else [teacher(), teacher(hidden=4)]
    cfg = dict(num_layers=2, hidden=8, filter_size=3, patch_size=4)
    cfg.update(bb)
    probe = create_model(backbone, **cfg)
    from transmem.models.tmu import resolve_layers
    lay = resolve_layers(layers, probe.num_layers)
    bank = MemoryBank(teachers, [f"t{i}" for i in range(len(teachers))], probe, lay, inputs)
    torch.manual_seed(1)
    model = create_model("tmu", backbone=backbone, backbone_config=cfg,
                         source_names=bank.names, source_channels=bank.source_channels(),
                         tmu_layers=lay, mode=mode, weighting=weighting, gates=gates)
    return model, bank


def clip(b=2, c=1):
    torch.manual_seed(3)
    return torch.rand(b, T, c, SIZE, SIZE)


def distill_loss(model, bank, x):
    _, aux = model(x, bank=bank(x), return_aux=True)
    return aux["distill_loss"]


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("layers", ["bottom", "all"])
def test_distill_gradient_reaches_distillers_and_backbone_below(backbone, layers):
    model, bank = build(backbone, layers=layers)
    x = clip()
    loss = distill_loss(model, bank, x)
    assert loss.requires_grad and loss.item() > 0
    loss.backward()
    top = max(model.layers)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("backbone.")), "the distillation loss does not reach the backbone"
    for name, p in model.named_parameters():
        if ".distill." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"distiller {name} gets no gradient"
        if name.startswith("backbone.cells."):
            layer = int(name.split(".")[2])
            if layer <= top:
                assert p.grad is not None and p.grad.abs().sum() > 0, f"backbone {name} gets no gradient"
    for name, p in bank.named_parameters():
        assert p.grad is None, f"teacher parameter {name} received a gradient"
        assert not p.requires_grad


def test_distill_loss_is_in_the_training_graph_and_teachers_stay_bit_identical():
    model, bank = build()
    before = copy.deepcopy(bank.state_dict())
    distillers_before = {k: v.clone() for k, v in model.state_dict().items() if ".distill." in k}
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=T, stop_step=10), lr=1e-2,
                            bank=bank, distill_weight=1.0)
    opt = module.configure_optimizers()
    batch = {"frames": clip()}
    for _ in range(3):
        loss, pred_loss, distill = module.compute_loss(batch)
        assert distill is not None and torch.isclose(loss, pred_loss + distill)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = bank.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    changed = [k for k, v in model.state_dict().items() if ".distill." in k and not torch.equal(v, distillers_before[k])]
    assert changed, "distillers did not train"
    assert all(k.startswith("bank.") is False for k in module.state_dict())


def test_distill_weight_zero_leaves_distillers_untrained():
    """With lambda = 0 (what the authors' code effectively trains) the distillers get no signal
    through the loss except via the zero-initialised projections, so at step 0 none at all."""
    model, bank = build()
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, distill_weight=0.0)
    loss, _, _ = module.compute_loss({"frames": clip()})
    loss.backward()
    for name, p in model.named_parameters():
        if ".distill." in name:
            assert p.grad is None or p.grad.abs().sum() == 0


class _AtStep(ForecastModule):
    """A module whose global step is set by hand (no trainer)."""
    step = 0

    @property
    def global_step(self):
        return self.step


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_distill_decay_schedule_and_gradient(decay):
    """lambda decays from distill_weight to 0 by the last step; while it is > 0 the distillation
    term is in the graph and trains the distillers, at the end it no longer reaches them."""
    model, bank = build()
    module = _AtStep(model, SamplingSchedule(t_in=3, frames=T), bank=bank, distill_weight=0.4,
                     distill_decay=decay, total_steps=100)
    expect = {0: 0.4, 50: 0.2, 100: 0.0, 150: 0.0}
    for step, lam in expect.items():
        module.step = step
        assert module.current_distill_weight() == pytest.approx(lam, abs=1e-9)
    module.step = 25
    assert module.current_distill_weight() == pytest.approx(0.3 if decay == "linear" else 0.4 * (0.5 + 0.5 * 2 ** -0.5))
    for step, reaches in [(0, True), (100, False)]:
        module.step = step
        model.zero_grad()
        loss, pred_loss, distill = module.compute_loss({"frames": clip()})
        assert torch.isclose(loss, pred_loss + module.current_distill_weight() * distill)
        loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if ".distill." in n]
        got = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert got == reaches
    with pytest.raises(ValueError, match="distill_decay"):
        ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, distill_decay="step")


def test_distill_span_input_uses_only_input_steps():
    """distill_span "input": teacher states after T_in do not enter the loss, those before do,
    and the distillers still get the gradient."""
    model, bank = build()
    x = clip()
    states = bank(x)
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, distill_weight=1.0,
                            distill_span="input")
    assert module.distill_until == 3

    def loss_with(states):
        _, aux = model(x, bank=states, return_aux=True, distill_until=module.distill_until)
        return aux["distill_loss"]

    base = loss_with(states)
    late = [{l: s.clone() for l, s in src.items()} for src in states]
    early = [{l: s.clone() for l, s in src.items()} for src in states]
    for src_late, src_early in zip(late, early):
        for l in src_late:
            src_late[l][:, 3:] += 5.0
            src_early[l][:, :3] += 5.0
    assert torch.equal(loss_with(late), base)
    assert loss_with(early) > base + 1.0
    _, aux = model(x, bank=states, return_aux=True)
    assert not torch.isclose(aux["distill_loss"], base)  # every step differs from input steps only
    model.zero_grad()
    base.backward()
    for name, p in model.named_parameters():
        if ".distill." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="distill_span"):
        ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, distill_span="late")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_any_number_of_teachers(n, backbone):
    teachers = [teacher(hidden=4 + 2 * i) for i in range(n)]
    model, bank = build(backbone, teachers=teachers, layers="all", weighting="softmax")
    x = clip()
    bank_out = bank(x)
    assert len(bank_out) == n and bank_out[n - 1][1].shape == (2, T - 1, 4 + 2 * (n - 1), 4, 4)
    y, aux = model(x, bank=bank_out, return_aux=True, record_maps=True)
    assert y.shape == (2, T - 1, 1, SIZE, SIZE)
    w = aux["maps"][0][0]["weight"]
    assert w.shape == (2, n, 4, 4)
    assert torch.allclose(w.sum(1), torch.ones(2, 4, 4), atol=1e-5)  # softmax over sources


def test_heterogeneous_teachers_family_width_depth_patch():
    teachers = [teacher("predrnn", hidden=12, num_layers=3, patch_size=2),
                teacher("convlstm", hidden=4, num_layers=1, patch_size=8)]
    model, bank = build("convlstm", teachers=teachers, layers="all")
    x = clip()
    b = bank(x)
    # teacher states resized to the target's 4x4 grid, in the teachers' own channel counts
    assert b[0][0].shape == (2, T - 1, 12, 4, 4) and b[1][1].shape == (2, T - 1, 4, 4, 4)
    assert bank.teacher_layer(0, 1) == 2 and bank.teacher_layer(1, 1) == 0  # depth mapping
    loss = distill_loss(model, bank, x)
    loss.backward()
    assert torch.isfinite(loss)


def test_rgb_target_reads_gray_teacher():
    probe = create_model("convlstm", num_layers=2, hidden=8, filter_size=3, patch_size=4, in_channels=3)
    bank = MemoryBank([teacher()], ["gray"], probe, [0], frame_channels=3)
    out = bank(clip(c=3))
    assert out[0][0].shape == (2, T - 1, 8, 4, 4)


def test_incompatible_teacher_channels_give_a_clear_error():
    probe = create_model("convlstm", num_layers=2, hidden=8, filter_size=3, patch_size=4, in_channels=2)
    with pytest.raises(TeacherMismatch) as e:
        MemoryBank([teacher()], ["mono"], probe, [0], frame_channels=2)
    msg = str(e.value)
    assert "'mono'" in msg and "1-channel" in msg and "2" in msg and "\n" not in msg


def test_distill_mode_predictions_do_not_depend_on_teachers():
    model, bank = build()
    model.eval()
    x = clip()
    with torch.inference_mode():
        alone = model(x, t_in=3)
        with_bank = model(x, t_in=3, bank=bank(x))
    assert torch.equal(alone, with_bank)
    # and after a training step (so that the transfer path is active, not zero)
    module = ForecastModule(model, SamplingSchedule(t_in=3, frames=T), lr=1e-1, bank=bank, distill_weight=1.0)
    opt = module.configure_optimizers()
    model.train()
    loss, _, _ = module.compute_loss({"frames": x})
    loss.backward()
    opt.step()
    model.eval()
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".project." in n)
    with torch.inference_mode():
        assert torch.equal(model(x, t_in=3), model(x, t_in=3, bank=bank(x)))
        assert not torch.equal(model(x, t_in=3), alone)


def test_bank_read_needs_and_uses_the_bank():
    model, bank = build(mode="bank_read")
    x = clip()
    with pytest.raises(ValueError, match="bank_read"):
        model(x)
    with torch.no_grad():
        for tr in model.transfer.values():  # projections start at zero: make the path active
            for proj in tr.project:
                torch.nn.init.normal_(proj.weight, std=0.5)
        b = bank(x)
        y1 = model(x, bank=b)
        b2 = [{l: s * 2 for l, s in src.items()} for src in b]
        y2 = model(x, bank=b2)
    assert not torch.allclose(y1, y2)


def test_own_vs_ground_truth_teacher_inputs():
    _, bank_gt = build(inputs="ground_truth")
    _, bank_own = build(inputs="own")
    x = clip()
    mask = torch.zeros(2, T - 1)
    mask[:, :2] = 1
    a = bank_gt(x, mask, 3)
    b = bank_own(x, mask, 3)
    # identical teachers and identical inputs up to t_in; the forecast part differs
    assert torch.allclose(a[0][0][:, :2], b[0][0][:, :2])
    assert not torch.allclose(a[0][0][:, 3:], b[0][0][:, 3:])
    # ground truth mode ignores the mask: a pure function of the clip
    assert torch.equal(bank_gt(x, mask, 3)[0][0], bank_gt(x, torch.ones(2, T - 1), None)[0][0])


@pytest.mark.parametrize("disk", [False, True])
def test_cached_bank_gives_the_same_loss(tmp_path, disk):
    model, bank = build()
    cache = BankCache(10, directory=tmp_path / "bank" if disk else None)
    sched = SamplingSchedule(t_in=3, frames=T)
    plain = ForecastModule(model, sched, bank=bank, distill_weight=0.5)
    cached = ForecastModule(model, sched, bank=bank, distill_weight=0.5, bank_cache=cache)
    batch = {"frames": clip(), "index": torch.tensor([3, 7])}
    ref = plain.compute_loss(batch)[0]
    first = cached.compute_loss(batch)[0]     # fills the cache
    calls = []
    bank.register_forward_hook(lambda *a: calls.append(1))
    second = cached.compute_loss(batch)[0]    # served from the cache
    assert calls == [], "teachers ran although the bank was cached"
    assert torch.allclose(ref, first) and torch.allclose(ref, second, atol=1e-7)
    if disk:  # a new cache object over the same folder reuses what was written
        again = BankCache(10, directory=tmp_path / "bank").get(torch.tensor([7, 3]))
        assert again is not None and torch.equal(again[0][0][0], bank(batch["frames"])[0][0][1])


def test_cache_refuses_own_mode_and_reversal():
    model, bank = build(inputs="own")
    with pytest.raises(ValueError, match="ground_truth"):
        ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, bank_cache=BankCache(4))
    model, bank = build()
    # time reversal is an augmentation: training/module.py now says "augmentation"
    with pytest.raises(ValueError, match="augmentation"):
        ForecastModule(model, SamplingSchedule(t_in=3, frames=T), bank=bank, bank_cache=BankCache(4),
                       reverse_prob=0.5)


def test_gates_off_is_a_plain_sum():
    model, bank = build(gates=False)
    assert all(tr.gate is None for tr in model.transfer.values())
    x = clip()
    y, aux = model(x, bank=bank(x), return_aux=True)
    assert torch.isfinite(y).all() and aux["distill_loss"] > 0


def test_bank_read_with_ground_truth_teachers_is_flagged():
    from transmem.api import transfer_caveats
    from transmem.config import TransferConfig
    assert transfer_caveats(TransferConfig()) == []
    assert transfer_caveats(TransferConfig(mode="bank_read", teacher_inputs="own")) == []
    (msg,) = transfer_caveats(TransferConfig(mode="bank_read"))
    assert "teacher_inputs own" in msg and "\n" not in msg


def test_only_bank_read_needs_teachers_at_inference():
    assert build(mode="bank_read")[0].needs_teachers_at_inference is True
    assert build(mode="distill")[0].needs_teachers_at_inference is False


def _random_tmu(backbone, layers, kernel, n, **kw):
    torch.manual_seed(0)
    cfg = dict(num_layers=2, hidden=6, filter_size=3, patch_size=4)
    model = create_model("tmu", backbone=backbone, backbone_config=cfg,
                         source_names=[f"s{i}" for i in range(n)], source_channels=[6, 4, 5][:n],
                         tmu_layers=layers, distiller_kernel=kernel, gate_kernel=kernel, **kw)
    for p in model.parameters():  # random projections: the transfer path must matter
        torch.nn.init.normal_(p, std=0.3)
    lay = [0] if layers == "bottom" else [0, 1]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, T, 1, SIZE, SIZE, generator=g)
    mask = (torch.rand(2, T - 1, generator=g) > 0.5).float()
    bank = [{l: torch.randn(2, T - 1, c, 4, 4, generator=g) for l in lay} for c in [6, 4, 5][:n]]
    return model, lay, x, mask, bank


def _forward_backward(model, x, mask, bank):
    """Outputs, distillation loss and every parameter's gradient of one training step."""
    model.zero_grad(set_to_none=True)
    out, aux = model(x, mask, bank=bank, return_aux=True)
    (out.square().mean() + aux["distill_loss"]).backward()
    return out.detach(), aux["distill_loss"].detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same_step(a, b):
    assert torch.allclose(a[0], b[0], atol=1e-5)
    assert torch.allclose(a[1], b[1], rtol=1e-5)
    for ga, gb in zip(a[2], b[2]):
        assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6 * max(1.0, gb.abs().max().item()))


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("layers,kernel,n", [("bottom", 1, 2), ("all", 3, 3)])
def test_fused_fast_path_matches_plain_autograd(backbone, layers, kernel, n, monkeypatch):
    """The default configuration runs one fused autograd node per step (folded projection,
    1x1 convolutions as matmuls, [x, h] shared with the backbone) while the kernels' switch is
    on. Outputs, the distillation loss and every gradient must equal those of the plain per-op
    path (switch off), and the switch must decide which one runs."""
    model, lay, x, mask, bank = _random_tmu(backbone, layers, kernel, n)
    calls = []
    real = kernels.distill_step
    monkeypatch.setattr(kernels, "distill_step", lambda *a: calls.append(1) or real(*a))
    assert all(model.transfer[str(l)].fusable for l in lay)
    with kernels.use_fused(True):
        fast = _forward_backward(model, x, mask, bank)
    assert len(calls) == len(lay) * (T - 1)
    calls.clear()
    with kernels.use_fused(False):
        plain = _forward_backward(model, x, mask, bank)
    assert calls == []
    _assert_same_step(fast, plain)
    assert fast[2][0].abs().max() > 0


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_tmu_model_passes_gradcheck_on_both_paths(backbone, fused):
    """The whole TMU model in double, gradient with respect to the frames and to the distiller,
    gate and projection weights, on the fused and on the plain path."""
    model, lay, x, mask, bank = _random_tmu(backbone, "bottom", 1, 2)
    model = model.double()
    x = x[:1, :4, :, :8, :8].double().requires_grad_()
    mask = mask[:1, :3].double()
    bank = [{l: s[:1, :3, :, :2, :2].double() for l, s in src.items()} for src in bank]
    tr = model.transfer["0"]
    names = ["transfer.0.distill.0.weight", "transfer.0.gate.weight", "transfer.0.project.1.weight"]
    params = dict(model.named_parameters())

    def fn(frames, *weights):
        out, aux = torch.func.functional_call(model, {**params, **dict(zip(names, weights))},
                                              (frames, mask), dict(bank=bank, return_aux=True))
        return out, aux["distill_loss"]

    weights = [params[k].detach().clone().requires_grad_() for k in names]
    with kernels.use_fused(fused):
        assert tr.fusable
        assert torch.autograd.gradcheck(fn, (x, *weights), fast_mode=True)


@pytest.mark.parametrize("joined", [True, False])
def test_distill_mix_node_passes_gradcheck(joined):
    from transmem.models.kernels import DistillMixFn
    torch.manual_seed(0)
    dd = dict(dtype=torch.double, requires_grad=True)
    hidden, src = 3, (3, 2)
    mem, x, h = torch.randn(2, hidden, 3, 3, **dd), torch.randn(2, 2, 3, 3, **dd), torch.randn(2, hidden, 3, 3, **dd)
    w, b = torch.randn(sum(src) + 2 * hidden, hidden, 1, 1, **dd), torch.randn(sum(src) + 2 * hidden, **dd)
    wg, bg = torch.randn(2 * hidden, 2 + hidden, 1, 1, **dd), torch.randn(2 * hidden, **dd)
    targets = [torch.randn(2, c, 3, 3, dtype=torch.double) for c in src]
    conf = (2, hidden, src, 0, 0)
    if joined:
        fn = lambda m, xh, *p: DistillMixFn.apply(m, xh, None, None, *p, conf, *targets)
        args = (mem, torch.cat([x, h], 1).detach().requires_grad_(), w, b, wg, bg)
    else:
        fn = lambda m, xi, hp, *p: DistillMixFn.apply(m, None, xi, hp, *p, conf, *targets)
        args = (mem, x, h, w, b, wg, bg)
    assert torch.autograd.gradcheck(fn, args)


def test_convlstm_hands_x_h_to_the_hook_and_the_tmu_gives_the_same_without_it():
    """ConvLSTM passes the [x, h] it built for its gates as ``xh`` (not at t = 0, where it builds
    none); PredRNN passes nothing. The TMU reads xh when given: outputs, loss and gradients are
    the same as when it builds [x, h] itself, on the fused and on the plain path."""
    seen = {}
    for name in ("convlstm", "predrnn"):
        torch.manual_seed(0)
        m = create_model(name, num_layers=2, hidden=8, filter_size=3, patch_size=4)

        def hook(layer, t, mem, x_in, h_prev, xh=None, name=name):
            seen.setdefault(name, []).append((t, x_in, h_prev, xh))
            return mem

        m(clip(), t_in=3, memory_hook=hook)
    assert len(seen["convlstm"]) == 2 * (T - 1)
    for t, x_in, h_prev, xh in seen["convlstm"]:
        if t == 0:
            assert xh is None
        else:
            assert torch.equal(xh, torch.cat([x_in, h_prev], 1))
    assert all(xh is None for *_, xh in seen["predrnn"])

    model, lay, x, mask, bank = _random_tmu("convlstm", "all", 1, 2)
    inner = model.backbone.forward

    def without_xh(*a, memory_hook=None, **k):  # the same backbone, hiding xh from the TMU
        return inner(*a, memory_hook=lambda l, t, mem, xi, hp, xh=None: memory_hook(l, t, mem, xi, hp), **k)

    for fused in (True, False):
        with kernels.use_fused(fused):
            with_xh = _forward_backward(model, x, mask, bank)
            model.backbone.forward = without_xh
            try:
                alone = _forward_backward(model, x, mask, bank)
            finally:
                del model.backbone.forward
        _assert_same_step(with_xh, alone)


@pytest.mark.parametrize("mode", ["distill", "bank_read"])
def test_tmu_trains_under_bf16_autocast(mode):
    """`train.precision: bf16-mixed` runs the model under autocast: the TMU must then take the
    per-op path (the fused node computes in one dtype) and still train its distillers."""
    model, bank = build(mode=mode)
    x = clip()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, aux = model(x, bank=bank(x), return_aux=True)
        loss = (out.float() - x[:, 1:]).square().mean() + aux["distill_loss"]
    loss.backward()
    assert torch.isfinite(loss)
    distiller = model.transfer["0"].distill[0].weight.grad
    assert distiller is not None and distiller.abs().max() > 0
