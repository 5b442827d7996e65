#!/usr/bin/env python3
"""Inpainting goldens from diffusers' `FluxInpaintPipeline`, on the tiny Flux
with the whole tiny VAE and init image of make_img2img_fixtures.py.

Run after make_flux_fixtures.py and make_img2img_fixtures.py, with
`pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_inpaint_fixtures.py

- `inpaint/mask.png`: 96×64 grayscale, white (repaint) over a rectangle and a
  disc with soft edges, so the binarisation at 0.5 (127 → keep, 128 → repaint) counts.
- `inpaint/mask-small.png`: a 40×30 RGB mask, which the pipeline resizes
  (Pillow's Lanczos, in RGB) to the output size before taking its luma.
- `inpaint/golden.safetensors`:
  - `mask.NAME`: the pipeline's packed latent mask (`prepare_mask_latents`);
  - `out.NAME.S`: its final packed latents at strength S, from the init image,
    `img2img/golden.safetensors`' noise and embeddings, the pipeline's noise and
    VAE sampling replaced by that noise and the distribution's mean.
"""
import json
from pathlib import Path

import diffusers
import numpy as np
import PIL
import torch
from diffusers import FluxInpaintPipeline
from diffusers.pipelines.flux import pipeline_flux_inpaint
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "inpaint"
OUT.mkdir(exist_ok=True)

W, H = 96, 64
yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
box = np.clip(np.minimum.reduce([xx - 8, 40 - xx, yy - 6, 30 - yy]) * 40 + 128, 0, 255)
disc = np.clip((20 - np.hypot(xx - 66, yy - 40)) * 24 + 128, 0, 255)
mask = np.maximum(box, disc)
# Rows the 8× nearest downsampling keeps (0, 8, …, 56): one at the threshold, one just below.
mask[0, :] = 128  # repaint
mask[56, :] = 127  # keep
Image.fromarray(np.rint(mask).astype(np.uint8), "L").save(OUT / "mask.png", optimize=False)
sy, sx = np.mgrid[0:30, 0:40].astype(np.float64)
small = np.stack([(sx > 12) * 255, (sy > 9) * 200, ((sx - 20) ** 2 + (sy - 15) ** 2 < 80) * 255], axis=-1)
Image.fromarray(small.astype(np.uint8), "RGB").save(OUT / "mask-small.png", optimize=False)

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((ROOT / "img2img" / "reference.json").read_text())
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxInpaintPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipeline_flux_inpaint.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
pipeline_flux_inpaint.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
masks = {}
original = pipe.prepare_mask_latents


def capture(mask, *args, **kwargs):
    packed, masked = original(mask, *args, **kwargs)
    masks[current] = packed
    return packed, masked


pipe.prepare_mask_latents = capture
init = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
gold = {}
STEPS, GUIDANCE, STRENGTHS = ref["steps"], ref["guidance"], [0.6, 1.0]
for current in ["mask", "mask-small"]:
    for s in STRENGTHS:
        with torch.no_grad():
            gold[f"out.{current}.{s}"] = pipe(
                image=init, mask_image=Image.open(OUT / f"{current}.png"), prompt_embeds=i2i["pipe.prompt_embeds"],
                pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H, strength=s, num_inference_steps=STEPS,
                guidance_scale=GUIDANCE, output_type="latent").images
    gold[f"mask.{current}"] = masks[current]

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "pillow": PIL.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strengths": STRENGTHS,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
