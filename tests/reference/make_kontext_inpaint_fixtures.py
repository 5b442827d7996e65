#!/usr/bin/env python3
"""FLUX.1 Kontext inpainting goldens from diffusers' `FluxKontextInpaintPipeline`
on the tiny Flux: the image to edit is noised to the strength's first sigma and
its kept part put back after each step (as `FluxInpaintPipeline`), while a
reference image's tokens follow the latents' (as `FluxKontextPipeline`): the
image itself, or another picture given as `image_reference`.

Run after make_img2img_fixtures.py and make_inpaint_fixtures.py, with
`pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_kontext_inpaint_fixtures.py

`kontext/inpaint-golden.safetensors`: `out.self` (the reference is the image)
and `out.photo` (the reference is images/photo.jpg, 160×96, at its own size),
the final packed latents for img2img's 96×64 init image with inpaint/mask.png
at strength 0.8, img2img's noise and embeddings, 4 steps, guidance 2.5, the
reference at its own size (`_auto_resize=False`), the pipeline's noise and VAE
sampling replaced by that noise and the distribution's mean.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxKontextInpaintPipeline
from diffusers.pipelines.flux import pipeline_flux_kontext_inpaint
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "kontext"
i2i = load_file(ROOT / "img2img" / "golden.safetensors")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxKontextInpaintPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipeline_flux_kontext_inpaint.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
pipeline_flux_kontext_inpaint.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
W, H, STEPS, GUIDANCE, STRENGTH = 96, 64, 4, 2.5, 0.8
init = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
mask = Image.open(ROOT / "inpaint" / "mask.png")
photo = Image.open(ROOT / "images" / "photo.jpg").convert("RGB")
gold = {}
for name, reference in {"self": None, "photo": photo}.items():
    with torch.no_grad():
        gold[f"out.{name}"] = pipe(
            image=init, image_reference=reference, mask_image=mask, prompt_embeds=i2i["pipe.prompt_embeds"],
            pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H, max_area=W * H, strength=STRENGTH,
            num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent", _auto_resize=False).images
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "inpaint-golden.safetensors")
(OUT / "inpaint-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strength": STRENGTH,
}, indent=2) + "\n")
print("wrote", {k: tuple(v.shape) for k, v in gold.items()})
