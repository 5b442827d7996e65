#!/usr/bin/env python3
"""PyTorch side of `ipaflux bench`: SigLIP so400m + the InstantX projection at the
real shapes, random weights, f32 on the CPU, batch 1. Prints one JSON line of
median milliseconds. Called by the Rust bench with the same run count."""
import json, os, sys, time

import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
with_proj = (sys.argv[2] if len(sys.argv) > 2 else "1") == "1"
torch.set_num_threads(os.cpu_count() or 1)
torch.manual_seed(0)
cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                         image_size=384, patch_size=14)
model = SiglipVisionModel(cfg).eval()
pixels = torch.randn(1, 3, 384, 384)

def median_ms(fn):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]

out = {"torch": torch.__version__, "threads": torch.get_num_threads()}
with torch.inference_mode():
    out["siglip_ms"] = median_ms(lambda: model(pixel_values=pixels).pooler_output)
    del model
    if with_proj:
        proj = torch.nn.Sequential(torch.nn.Linear(1152, 2304), torch.nn.GELU(), torch.nn.Linear(2304, 128 * 4096))
        norm = torch.nn.LayerNorm(4096)
        pooled = torch.randn(1, 1152)
        out["projection_ms"] = median_ms(lambda: norm(proj(pooled).reshape(-1, 128, 4096)))
print(json.dumps(out))
