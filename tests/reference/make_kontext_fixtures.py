#!/usr/bin/env python3
"""FLUX.1 Kontext goldens from diffusers' `FluxKontextPipeline` on the tiny
Flux (Kontext-dev has FLUX.1-dev's architecture; what differs is the reference
image's tokens appended after the latents'), with the whole tiny VAE and the
init image of make_img2img_fixtures.py as the reference.

Run after make_flux_fixtures.py and make_img2img_fixtures.py, with
`pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_kontext_fixtures.py

`kontext/golden.safetensors`: `latents` (the packed start noise), and `out`,
the pipeline's final packed latents for a 64×48 output with the 96×64
reference at its own size (`_auto_resize=False`: the preferred resolutions
are too large for a test), img2img's embeddings, guidance 2.5.
`kontext/reference.json` also lists `auto_resize`: image sizes and the
preferred size the pipeline's `_auto_resize` picks for each (its rule,
evaluated here with its table).
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "kontext"
OUT.mkdir(exist_ok=True)
torch.manual_seed(61)

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxKontextPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
W, H, STEPS, GUIDANCE = 64, 48, 4, 2.5
gold = {"latents": torch.randn(1, (H // 16) * (W // 16), 64)}
image = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
with torch.no_grad():
    gold["out"] = pipe(image=image, prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
                       width=W, height=H, max_area=W * H, latents=gold["latents"].clone(), num_inference_steps=STEPS,
                       guidance_scale=GUIDANCE, output_type="latent", _auto_resize=False).images


def preferred(w, h):  # the pipeline's `_auto_resize` rule
    _, pw, ph = min((abs(w / h - rw / rh), rw, rh) for rw, rh in PREFERRED_KONTEXT_RESOLUTIONS)
    return [pw // 16 * 16, ph // 16 * 16]


sizes = [(96, 64), (64, 96), (1024, 1024), (1920, 1080), (1080, 1920), (500, 333), (4000, 1000), (100, 700)]
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE,
    "auto_resize": [[w, h] + preferred(w, h) for w, h in sizes],
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
