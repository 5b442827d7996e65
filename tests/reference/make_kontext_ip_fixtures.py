#!/usr/bin/env python3
"""FLUX.1 Kontext with XLabs' IP-Adapter: diffusers' `FluxKontextPipeline`
with `load_ip_adapter`, the image to edit and a reference image for the
adapter together (`generate --kontext-image R --image P` with XLabs'
adapter), on the tiny fixtures of make_kontext_fixtures.py and
make_xlabs_fixtures.py.

Run after those two, with `pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_kontext_ip_fixtures.py

`kontext/ip-golden.safetensors`: `out`, the pipeline's final packed latents
(img2img/init.png as the image to edit at its own size, images/photo.jpg for
the IP-Adapter at scale 0.8; kontext/golden.safetensors' start noise,
img2img's embeddings, 64×48, 4 steps, guidance 2.5).
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "kontext"
i2i = load_file(ROOT / "img2img" / "golden.safetensors")
kontext = load_file(OUT / "golden.safetensors")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxKontextPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipe.load_ip_adapter(str(ROOT / "xlabs"), weight_name="ip_adapter.safetensors",
                     image_encoder_pretrained_model_name_or_path=str(ROOT / "xlabs" / "image_encoder"),
                     image_encoder_dtype=torch.float32)
W, H, STEPS, GUIDANCE, SCALE = 64, 48, 4, 2.5, 0.8
pipe.set_ip_adapter_scale(SCALE)
image = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
photo = Image.open(ROOT / "images" / "photo.jpg").convert("RGB")
with torch.no_grad():
    out = pipe(image=image, ip_adapter_image=photo, prompt_embeds=i2i["pipe.prompt_embeds"],
               pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H, max_area=W * H,
               latents=kontext["latents"].clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               output_type="latent", _auto_resize=False).images
save_file({"out": out.contiguous()}, OUT / "ip-golden.safetensors")
(OUT / "ip-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "scale": SCALE,
}, indent=2) + "\n")
print("wrote ip-golden.safetensors", tuple(out.shape))
