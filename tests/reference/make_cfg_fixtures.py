#!/usr/bin/env python3
"""True classifier-free guidance golden: diffusers' `FluxPipeline` with
`true_cfg_scale` and a negative prompt, on the tiny Flux of `flux/transformer`.

Run after make_flux_fixtures.py and make_img2img_fixtures.py (whose VAE folder
the pipeline needs for its sizes), with `pip install torch diffusers safetensors`:
    python3 tests/reference/make_cfg_fixtures.py

`cfg/golden.safetensors`: the packed start latents `latents`, positive and
negative T5/CLIP stand-ins (`prompt_embeds`, `pooled`, `negative_prompt_embeds`,
`negative_pooled`), and `out.S`: the final packed latents at true-CFG scale S
(FLUX.1-dev's scheduler config, distilled guidance 3.5 in both passes:
`v = v₋ + S · (v₊ − v₋)` each step). Scale 1 is the pipeline without the
negative pass.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "cfg"
OUT.mkdir(exist_ok=True)
torch.manual_seed(31)

transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
W, H, STEPS, GUIDANCE = 64, 48, 4, 3.5
TOKENS, CTX, POOLED = 7, transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim
gold = {
    "latents": torch.randn(1, (H // 16) * (W // 16), 64),
    "prompt_embeds": torch.randn(1, TOKENS, CTX),
    "pooled": torch.randn(1, POOLED),
    "negative_prompt_embeds": torch.randn(1, TOKENS, CTX),
    "negative_pooled": torch.randn(1, POOLED),
}
SCALES = [1.0, 4.0]
for scale in SCALES:
    with torch.no_grad():
        gold[f"out.{scale}"] = pipe(
            prompt_embeds=gold["prompt_embeds"], pooled_prompt_embeds=gold["pooled"],
            negative_prompt_embeds=gold["negative_prompt_embeds"],
            negative_pooled_prompt_embeds=gold["negative_pooled"], true_cfg_scale=scale,
            latents=gold["latents"].clone(), width=W, height=H, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            output_type="latent").images

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "scales": SCALES,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
