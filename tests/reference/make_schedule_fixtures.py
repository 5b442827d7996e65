#!/usr/bin/env python3
"""Reference values for core/src/schedule.rs: BFL's get_schedule (flux/sampling.py)
and ComfyUI's ModelSamplingFlux.percent_to_sigma, restated here in torch/Python
exactly as upstream computes them. Writes tests/fixtures/schedule.json."""
import json
import math
from pathlib import Path

import torch


def time_shift(mu, sigma, t):
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15):
    m = (y2 - y1) / (x2 - x1)
    b = y1 - m * x1
    return lambda x: m * x + b


def get_schedule(num_steps, image_seq_len, base_shift=0.5, max_shift=1.15, shift=True):
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def percent_to_sigma(percent, shift=1.15):
    if percent <= 0.0:
        return 1.0
    if percent >= 1.0:
        return 0.0
    return time_shift(shift, 1.0, 1.0 - percent)


cases = []
for steps, tokens, shift in [(4, 256, False), (20, 4096, True), (28, 1024, True), (50, 4096, True), (1, 64, True), (30, 6400, True)]:
    cases.append({"steps": steps, "tokens": tokens, "shift": shift, "timesteps": get_schedule(steps, tokens, shift=shift)})
percents = [0.0, 0.05, 0.1, 0.25, 0.333, 0.5, 0.75, 0.9, 0.99, 1.0]
out = {
    "torch": torch.__version__,
    "schedules": cases,
    "percent_to_sigma": [[p, percent_to_sigma(p)] for p in percents],
}
path = Path(__file__).resolve().parent.parent / "fixtures" / "schedule.json"
path.write_text(json.dumps(out, indent=1))
print("wrote", path)
