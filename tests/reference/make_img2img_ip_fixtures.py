#!/usr/bin/env python3
"""Image-to-image with XLabs' IP-Adapter: diffusers' `FluxImg2ImgPipeline`
with `load_ip_adapter`, an init image and a reference image for the adapter
together (`generate --init-image X --image P` with XLabs' adapter), on the
tiny fixtures of make_img2img_fixtures.py and make_xlabs_fixtures.py.

Run after those two, with `pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_img2img_ip_fixtures.py

`img2img/ip-golden.safetensors`: `out`, the pipeline's final packed latents at
strength 0.6 (img2img/init.png, 96×64, 6 steps, guidance 3.5; its noise and
embeddings from img2img/golden.safetensors, the VAE's mean as its encoding, as
make_img2img_fixtures.py runs it), images/photo.jpg for the adapter at 0.8.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxImg2ImgPipeline
from diffusers.pipelines.flux import pipeline_flux_img2img
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "img2img"
i2i = load_file(OUT / "golden.safetensors")
noise = i2i["pipe.noise"]
# The pipeline's own noise and VAE sampling replaced by ours (and the distribution's mean).
pipeline_flux_img2img.randn_tensor = lambda shape, **_: noise.clone()
pipeline_flux_img2img.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxImg2ImgPipeline, transformer, flux_pipelines.vae(OUT / "vae"))
pipe.load_ip_adapter(str(ROOT / "xlabs"), weight_name="ip_adapter.safetensors",
                     image_encoder_pretrained_model_name_or_path=str(ROOT / "xlabs" / "image_encoder"),
                     image_encoder_dtype=torch.float32)
W, H, STEPS, GUIDANCE, STRENGTH, SCALE = 96, 64, 6, 3.5, 0.6, 0.8
pipe.set_ip_adapter_scale(SCALE)
image = Image.open(OUT / "init.png").convert("RGB")
photo = Image.open(ROOT / "images" / "photo.jpg").convert("RGB")
with torch.no_grad():
    out = pipe(image=image, ip_adapter_image=photo, prompt_embeds=i2i["pipe.prompt_embeds"],
               pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H, strength=STRENGTH,
               num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
save_file({"out": out.contiguous()}, OUT / "ip-golden.safetensors")
(OUT / "ip-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strength": STRENGTH, "scale": SCALE,
}, indent=2) + "\n")
print("wrote ip-golden.safetensors", tuple(out.shape))
