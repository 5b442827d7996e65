#!/usr/bin/env python3
"""PyTorch's figures for `ipaflux gpu-check --torch FILE`, measured on the same
card in the same run (scripts/gpu-check.sh runs both).

Random weights at the real shapes, bf16, eager PyTorch with SDPA attention,
CUDA events around each call, median of --runs after warm-up:
  siglip_ms            transformers SiglipVisionModel (so400m-patch14-384), batch 1: median of at least
                       SIGLIP_RUNS after 10 warm-up calls (eager batch 1 is launch-bound: the host's speed
                       moved it 2x between runs in session 11, so it gets more calls than the others)
  siglip_min_ms        the fastest of those calls (PyTorch at its best, for a verdict that noise cannot flip)
  projection_ms        the InstantX image projection: Linear 1152→2304, GELU, Linear →128×4096, LayerNorm
  flux_{S}_ms          diffusers FluxTransformer2DModel (FLUX.1-dev config), one step at S² (S/16)² image + 512 text tokens
  flux_{S}_peak_gib    torch.cuda.max_memory_allocated during that step, weights included
  flux_{S}_before_gib  torch.cuda.memory_allocated just before it (weights and inputs): peak − before is the
                       step's own memory, which gpu-check compares with ours
  ip_cached_ms_{S}     the IP branch of a step: per block, SDPA of the block's query over 128 cached image tokens,
                       scaled and added (19 double blocks over the image tokens, 38 single over all tokens)
  ip_recomputed_ms_{S} the same with to_k_ip/to_v_ip and the K RMSNorm recomputed per block (InstantX math)
  h2d_pinned_gbs, h2d_pageable_gbs, d2h_pinned_gbs, d2h_pageable_gbs   1 GiB copies, best of 5

Writes one JSON object of numbers (and a few strings). Needs torch, transformers and diffusers.
"""
import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def timings(fn, runs, warmup=2):
    """Milliseconds of each of `runs` calls after `warmup` ones (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def timed(fn, runs, warmup=2):
    return statistics.median(timings(fn, runs, warmup))


SIGLIP_RUNS = 30


def siglip(runs, out):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                             num_attention_heads=16, image_size=384, patch_size=14,
                             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    with torch.device("cuda"):
        model = SiglipVisionModel(cfg).to(torch.bfloat16).eval()
    x = torch.randn(1, 3, 384, 384, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        times = timings(lambda: model(pixel_values=x).pooler_output, max(runs, SIGLIP_RUNS), warmup=10)
    del model
    out["siglip_ms"] = statistics.median(times)
    out["siglip_min_ms"] = min(times)


def projection(runs):
    with torch.device("cuda"):
        proj = torch.nn.Sequential(torch.nn.Linear(1152, 2304), torch.nn.GELU(),
                                   torch.nn.Linear(2304, 128 * 4096)).to(torch.bfloat16)
        norm = torch.nn.LayerNorm(4096).to(torch.bfloat16)
    x = torch.randn(1, 1152, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ms = timed(lambda: norm(proj(x).reshape(1, 128, 4096)), max(runs, 10))
    del proj, norm
    return ms


def flux(sizes, runs, out):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                       attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                       pooled_projection_dim=768, guidance_embeds=True,
                                       axes_dims_rope=(16, 56, 56)).eval()
    torch.set_default_dtype(prev)
    for s in sizes:
        n = (s // 16) ** 2
        side = s // 16
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1] = torch.arange(side)[:, None]
        img_ids[..., 2] = torch.arange(side)[None, :]
        kw = dict(
            hidden_states=torch.randn(1, n, 64, device="cuda", dtype=torch.bfloat16),
            encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16),
            pooled_projections=torch.randn(1, 768, device="cuda", dtype=torch.bfloat16),
            timestep=torch.tensor([0.7], device="cuda", dtype=torch.bfloat16),
            guidance=torch.tensor([3.5], device="cuda", dtype=torch.bfloat16),
            img_ids=img_ids.reshape(n, 3).to("cuda", torch.bfloat16),
            txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16),
            return_dict=False,
        )
        with torch.inference_mode():
            model(**kw)
            torch.cuda.synchronize()
            out[f"flux_{s}_before_gib"] = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            out[f"flux_{s}_ms"] = timed(lambda: model(**kw), runs, warmup=1)
        out[f"flux_{s}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"flux {s}²: {out[f'flux_{s}_ms']:.2f} ms, peak {out[f'flux_{s}_peak_gib']:.2f} GiB", file=sys.stderr)
    del model
    torch.cuda.empty_cache()


def ip_branch(sizes, runs, out):
    heads, d, hidden, cross = 24, 128, 3072, 4096
    with torch.device("cuda"):
        to_k = [torch.nn.Linear(cross, hidden, bias=False).to(torch.bfloat16) for _ in range(57)]
        to_v = [torch.nn.Linear(cross, hidden, bias=False).to(torch.bfloat16) for _ in range(57)]
    embeds = torch.randn(1, 128, cross, device="cuda", dtype=torch.bfloat16)

    def kv(i):
        k = to_k[i](embeds).view(1, 128, heads, d).transpose(1, 2)
        v = to_v[i](embeds).view(1, 128, heads, d).transpose(1, 2)
        k = k * torch.rsqrt(k.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(k.dtype)
        return k, v

    with torch.inference_mode():
        cached = [kv(i) for i in range(57)]
        for s in sizes:
            n = (s // 16) ** 2
            qs = {L: torch.randn(1, heads, L, d, device="cuda", dtype=torch.bfloat16) for L in (n, n + 512)}
            attn = {L: torch.randn(1, L, hidden, device="cuda", dtype=torch.bfloat16) for L in (n, n + 512)}

            def branch(recompute):
                for i in range(57):
                    L = n if i < 19 else n + 512
                    k, v = kv(i) if recompute else cached[i]
                    o = F.scaled_dot_product_attention(qs[L], k, v)
                    attn[L].add_(o.transpose(1, 2).reshape(1, L, hidden), alpha=0.7)

            out[f"ip_cached_ms_{s}"] = timed(lambda: branch(False), max(runs, 10))
            out[f"ip_recomputed_ms_{s}"] = timed(lambda: branch(True), max(runs, 10))


def transfers(out):
    n = 1 << 28  # f32 elements: 1 GiB
    pinned = torch.empty(n, dtype=torch.float32, pin_memory=True).fill_(0.5)
    pageable = torch.full((n,), 0.5, dtype=torch.float32)
    dev = torch.empty(n, dtype=torch.float32, device="cuda")

    def best(fn):
        fn()
        torch.cuda.synchronize()
        b = 0.0
        for _ in range(5):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            b = max(b, n * 4 / (time.perf_counter() - t) / 1e9)
        return b

    out["h2d_pinned_gbs"] = best(lambda: dev.copy_(pinned, non_blocking=True))
    out["h2d_pageable_gbs"] = best(lambda: dev.copy_(pageable))
    out["d2h_pinned_gbs"] = best(lambda: pinned.copy_(dev, non_blocking=True))
    out["d2h_pageable_gbs"] = best(lambda: pageable.copy_(dev))
    del pinned, pageable, dev


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="where to write the figures")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    a = ap.parse_args()
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    steps = [("transfers", lambda: transfers(out)),
             ("siglip", lambda: siglip(a.runs, out)),
             ("projection", lambda: out.__setitem__("projection_ms", projection(a.runs))),
             ("ip branch", lambda: ip_branch(a.sizes, a.runs, out)),
             ("flux", lambda: flux(a.sizes, a.runs, out))]
    for name, step in steps:
        t = time.perf_counter()
        try:
            step()
        except Exception as e:  # report and go on: one missing figure must not lose the others
            print(f"gpu_bench_torch: {name} failed: {e!r}", file=sys.stderr)
            out[f"{name}_error"] = repr(e)
        print(f"gpu_bench_torch: {name} done in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
