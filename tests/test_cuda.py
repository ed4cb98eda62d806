"""The same models on a CUDA device: every registered backbone and the TMU give the CPU's
forecasts and gradients, and the benchmark workload runs there. Skipped without a GPU;
``benchmarks/gpu_check.py`` runs them (``pytest -m cuda``)."""
import pytest
import torch

from transmem.bench import BenchSpec, Workload
from transmem.models import create_model, list_models

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CFG = dict(num_layers=2, hidden=8, filter_size=3, patch_size=2)


@pytest.mark.parametrize("name", list_models(kind="backbone"))
def test_backbone_on_cuda_matches_cpu(name):
    torch.manual_seed(0)
    model = create_model(name, **CFG)
    frames = torch.rand(2, 6, 1, 16, 16)
    loss_cpu = model(frames, t_in=3).square().mean()
    loss_cpu.backward()
    grads_cpu = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    model.cuda()
    loss_gpu = model(frames.cuda(), t_in=3).square().mean()
    loss_gpu.backward()
    grads_gpu = [p.grad.cpu() for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_gpu, grads_cpu):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_tmu_distill_gradient_on_cuda():
    torch.manual_seed(0)
    tmu = create_model("tmu", backbone="convlstm", backbone_config=CFG, source_names=["a", "b"],
                       source_channels=[8, 8], tmu_layers=[0]).cuda()
    frames = torch.rand(2, 6, 1, 16, 16, device="cuda")
    bank = [{0: torch.randn(2, 5, 8, 8, 8, device="cuda")} for _ in range(2)]
    _, aux = tmu(frames, t_in=3, bank=bank, return_aux=True)
    aux["distill_loss"].backward()
    assert tmu.transfer["0"].distill[0].weight.grad.abs().sum() > 0
    assert tmu.backbone.cells[0].conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_bench_workload_on_cuda(precision):
    w = Workload(BenchSpec(model="tmu", teachers=2, cached_bank=True, layers=2, hidden=8, filter=3,
                           patch=2, size=16, batch=2, frames=6, device="cuda", precision=precision))
    before = [p.detach().clone() for p in w.model.parameters()]
    w.train_step()
    w.infer_step()
    assert any(not torch.equal(a, b) for a, b in zip(before, w.model.parameters()))
