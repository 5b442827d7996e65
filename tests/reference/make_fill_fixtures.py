#!/usr/bin/env python3
"""FLUX.1 Fill fixtures: a tiny random Fill transformer (384 input channels:
the latents, the masked image's latents and the 8×8 mask) with goldens from
diffusers' `FluxFillPipeline`.

Run after make_img2img_fixtures.py and make_inpaint_fixtures.py (their VAE,
init image, noise, embeddings and mask), with `pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_fill_fixtures.py

- `fill/transformer/`: diffusers `FluxTransformer2DModel.save_pretrained`, bf16,
  the tiny Flux's sizes with `in_channels` 384 and `out_channels` 64 as FLUX.1-Fill-dev.
- `fill/golden.safetensors`: `cond`, the pipeline's per-token conditioning
  (packed masked-image latents, then the packed 8×8 mask: `[1, tokens, 320]`),
  and `out.S`, its final packed latents at strength S, with the pipeline's
  noise and VAE sampling replaced by img2img's noise and the distribution's mean.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxFillPipeline
from diffusers.pipelines.flux import pipeline_flux_fill
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "fill"
OUT.mkdir(exist_ok=True)
torch.manual_seed(51)

model = flux_pipelines.random_transformer(384)
model.to(torch.bfloat16).save_pretrained(OUT / "transformer")
transformer = flux_pipelines.transformer(OUT / "transformer")

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((ROOT / "img2img" / "reference.json").read_text())
W, H = ref["image"]
pipe = flux_pipelines.pipeline(FluxFillPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipeline_flux_fill.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
pipeline_flux_fill.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
gold = {}
flux_pipelines.capture_conditioning(transformer, gold)
STEPS, GUIDANCE, STRENGTHS = ref["steps"], 30.0, [1.0, 0.6]
init = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
for s in STRENGTHS:
    with torch.no_grad():
        gold[f"out.{s}"] = pipe(
            image=init, mask_image=Image.open(ROOT / "inpaint" / "mask.png"), prompt_embeds=i2i["pipe.prompt_embeds"],
            pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H, strength=s, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, output_type="latent").images

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strengths": STRENGTHS,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
