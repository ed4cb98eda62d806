"""The registry's backbones, for the protocol tests that sweep them (pysteps' interface-test
style): a backbone added by a file or a plugin is tested with no edit here. A property that does
not apply to a backbone is opted out by a declaration on its class, never by a list of names:
``starts_as_persistence`` (heads that start at zero) makes :func:`small` randomise those heads so
that the output depends on the memory."""
import torch

from transmem.models import create_model, get_model_class, list_models

BACKBONES = list_models(kind="backbone")  # every registered backbone, found by the package scan


def small(name, seed: int = 1, **kw):
    """A small ``name`` backbone (2 layers of 8, 3x3 filters, patch 4; ``kw`` overrides)."""
    cfg = dict(num_layers=2, hidden=8, filter_size=3, patch_size=4)
    cfg.update(kw)
    m = create_model(name, **cfg)
    if get_model_class(name).starts_as_persistence:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in m.parameters():
                if not p.any():
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return m


def trained_convlstm(arch: dict, clips, steps: int = 30, seed: int = 0):
    """A convlstm of config ``arch`` trained briefly (teacher forcing) on the batches
    ``clips(step)``: a zoo entry with a known history, for ranking and mixture tests."""
    from transmem.training import forecast_loss
    torch.manual_seed(seed)
    model = create_model("convlstm", arch)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        loss, _, _ = forecast_loss(model, clips(step), None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
