#!/usr/bin/env python3
"""The IP-Adapter under true classifier-free guidance: diffusers' `FluxPipeline`
with XLabs' IP-Adapter (`load_ip_adapter`), `true_cfg_scale` 4 and a negative
prompt, on the tiny fixtures of make_xlabs_fixtures.py and make_cfg_fixtures.py.

diffusers gives the negative pass a black image unless told
`negative_ip_adapter_image`; ComfyUI's patched model gives both passes the same
reference. Both are goldens here (the second by passing the reference as the
negative image too), and a third picture as `negative_ip_adapter_image`.

Run after make_xlabs_fixtures.py and make_cfg_fixtures.py, with
`pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_ip_cfg_fixtures.py

`xlabs/cfg-golden.safetensors`: `black_image_embeds` (CLIP's `image_embeds` of
the black negative image), `out.black` (the final packed latents, diffusers'
default), `out.same` (the reference in both passes) and `out.image`
(images/alpha.png as the negative image); the latents and
prompts are cfg/golden.safetensors'; IP scale 0.8, 4 steps, guidance 3.5, 64×48.
"""
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "xlabs"
cfg = load_file(ROOT / "cfg" / "golden.safetensors")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipe.load_ip_adapter(str(OUT), weight_name="ip_adapter.safetensors",
                     image_encoder_pretrained_model_name_or_path=str(OUT / "image_encoder"),
                     image_encoder_dtype=torch.float32)
SCALE, TRUE_CFG, W, H, STEPS, GUIDANCE = 0.8, 4.0, 64, 48, 4, 3.5
pipe.set_ip_adapter_scale(SCALE)
photo = Image.open(ROOT / "images" / "photo.jpg").convert("RGB")
other = Image.open(ROOT / "images" / "alpha.png").convert("RGB")
gold = {}
with torch.no_grad():
    # The pipeline's own black image: np.zeros((width, height, 3)).
    black = pipe.feature_extractor(np.zeros((W, H, 3), dtype=np.uint8), return_tensors="pt").pixel_values
    gold["black_image_embeds"] = pipe.image_encoder(black).image_embeds
    for name, negative in {"black": None, "same": photo, "image": other}.items():
        gold[f"out.{name}"] = pipe(
            prompt_embeds=cfg["prompt_embeds"], pooled_prompt_embeds=cfg["pooled"],
            negative_prompt_embeds=cfg["negative_prompt_embeds"], negative_pooled_prompt_embeds=cfg["negative_pooled"],
            true_cfg_scale=TRUE_CFG, ip_adapter_image=photo, negative_ip_adapter_image=negative,
            width=W, height=H, latents=cfg["latents"].clone(), num_inference_steps=STEPS, guidance_scale=GUIDANCE,
            output_type="latent").images
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "cfg-golden.safetensors")
(OUT / "cfg-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "image": [W, H], "steps": STEPS,
    "guidance": GUIDANCE, "scale": SCALE, "true_cfg": TRUE_CFG,
}, indent=2) + "\n")
print("wrote cfg-golden.safetensors", {k: tuple(v.shape) for k, v in gold.items()})
