#!/usr/bin/env python3
"""FLUX.1 Canny/Depth ("Control") fixtures: a tiny random Control transformer
(128 input channels: the latents, then the control image's VAE latents) with
goldens from diffusers' `FluxControlPipeline`, `FluxControlImg2ImgPipeline`
and `FluxControlInpaintPipeline`.

Run after make_img2img_fixtures.py and make_inpaint_fixtures.py (their VAE,
init image, noise, embeddings and mask), with `pip install torch diffusers safetensors pillow numpy`:
    python3 tests/reference/make_control_fixtures.py

- `control/transformer/`: diffusers `FluxTransformer2DModel.save_pretrained`, bf16,
  the tiny Flux's sizes with `in_channels` 128 and `out_channels` 64 as
  FLUX.1-Canny-dev and FLUX.1-Depth-dev.
- `control/control.png`: a 40×24 edge map (white lines on black, as a Canny
  preprocessor gives), which the pipelines resize to the 96×64 output (Lanczos).
- `control/golden.safetensors`: `cond`, the packed control latents the
  transformer gets after the latents' 64 channels (`[1, tokens, 64]`), and
  the final packed latents: `out.t2i` (from img2img's noise), `out.img2img`
  (img2img's init image at strength 0.6) and `out.inpaint` (with inpaint's
  mask at strength 0.8). The pipelines' VAE sampling is replaced by the
  distribution's mean, and their noise by img2img's.
"""
import json
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import FluxControlImg2ImgPipeline, FluxControlInpaintPipeline, FluxControlPipeline
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.flux import pipeline_flux_control, pipeline_flux_control_img2img, pipeline_flux_control_inpaint
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "control"
OUT.mkdir(exist_ok=True)
torch.manual_seed(71)

model = flux_pipelines.random_transformer(128)
model.to(torch.bfloat16).save_pretrained(OUT / "transformer")
transformer = flux_pipelines.transformer(OUT / "transformer")

# An edge map: a box outline, a diagonal and a ring, one pixel wide.
yy, xx = np.mgrid[0:24, 0:40]
edges = (((yy == 3) | (yy == 20)) & (xx >= 4) & (xx <= 30)) | (((xx == 4) | (xx == 30)) & (yy >= 3) & (yy <= 20))
edges |= np.abs(xx - 2 * yy) == 0
edges |= np.abs(np.hypot(xx - 33, yy - 12) - 5) < 0.5
Image.fromarray(np.where(edges, 255, 0).astype(np.uint8), "L").convert("RGB").save(OUT / "control.png", optimize=False)

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((ROOT / "img2img" / "reference.json").read_text())
W, H = ref["image"]
vae = flux_pipelines.vae(ROOT / "img2img" / "vae")
# The control image is encoded with `latent_dist.sample`, the init image through
# `retrieve_latents`: both take the mean here, as generate does.
vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
for module in (pipeline_flux_control, pipeline_flux_control_img2img, pipeline_flux_control_inpaint):
    module.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
gold = {}
forward = transformer.forward


def capture(*args, hidden_states=None, **kwargs):
    gold["cond"] = hidden_states[..., 64:].clone()
    return forward(*args, hidden_states=hidden_states, **kwargs)


transformer.forward = capture
STEPS, GUIDANCE, STRENGTH, INPAINT_STRENGTH = ref["steps"], 30.0, 0.6, 0.8
control = Image.open(OUT / "control.png").convert("RGB")
init = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
common = dict(control_image=control, prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
              width=W, height=H, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent")
with torch.no_grad():
    gold["out.t2i"] = flux_pipelines.pipeline(FluxControlPipeline, transformer, vae)(**common).images
    gold["out.img2img"] = flux_pipelines.pipeline(FluxControlImg2ImgPipeline, transformer, vae)(
        image=init, strength=STRENGTH, **common).images
    gold["out.inpaint"] = flux_pipelines.pipeline(FluxControlInpaintPipeline, transformer, vae)(
        image=init, mask_image=Image.open(ROOT / "inpaint" / "mask.png"), strength=INPAINT_STRENGTH, **common).images

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strength": STRENGTH, "inpaint_strength": INPAINT_STRENGTH,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
