"""Random weights for the tiny Depth Anything fixtures, shared by
make_depth_fixtures.py (transformers' classes) and
make_depth_original_fixtures.py (the original repository's): layer scales
in 0.5..1 (`layer_scale` names them), norms near 1 and 0, other vectors
small, matrices and kernels scaled by their fan-in. Draws from torch's
global generator in parameter order, so a seed set before gives the same
weights every run."""
import torch


def fill(model, layer_scale):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(layer_scale):
                p.copy_(0.5 + 0.5 * torch.rand_like(p))
            elif p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
