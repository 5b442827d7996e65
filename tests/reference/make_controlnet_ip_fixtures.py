#!/usr/bin/env python3
"""A Flux ControlNet with XLabs' IP-Adapter: diffusers' `FluxControlNetPipeline`
with `load_ip_adapter` (`generate --controlnet N --control-image C --image P`
with XLabs' adapter), on the tiny fixtures of make_controlnet_fixtures.py and
make_xlabs_fixtures.py. The adapter's processors are the transformer's only:
the ControlNet's blocks run without them, as in ComfyUI.

Run after those two, with `pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_controlnet_ip_fixtures.py

`controlnet/ip-golden.safetensors`: `out`, the final packed latents with the
Canny net as in `out.canny` (scale 0.7, `control_guidance_end` 0.8) and
images/photo.jpg for the adapter at 0.8.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.flux import pipeline_flux_controlnet
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "controlnet"
i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((OUT / "reference.json").read_text())
vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
pipeline_flux_controlnet.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
net = FluxControlNetModel.from_pretrained(OUT / "canny", torch_dtype=torch.float32).eval()
pipe = FluxControlNetPipeline(scheduler=flux_pipelines.dev_scheduler(),
                              vae=flux_pipelines.vae(ROOT / "img2img" / "vae"), text_encoder=None, tokenizer=None,
                              text_encoder_2=None, tokenizer_2=None,
                              transformer=flux_pipelines.transformer(ROOT / "flux" / "transformer"), controlnet=net)
pipe.load_ip_adapter(str(ROOT / "xlabs"), weight_name="ip_adapter.safetensors",
                     image_encoder_pretrained_model_name_or_path=str(ROOT / "xlabs" / "image_encoder"),
                     image_encoder_dtype=torch.float32)
SCALE = 0.8
pipe.set_ip_adapter_scale(SCALE)
W, H = ref["image"]
canny = ref["canny"]
with torch.no_grad():
    out = pipe(control_image=Image.open(ROOT / "control" / "control.png").convert("RGB"),
               ip_adapter_image=Image.open(ROOT / "images" / "photo.jpg").convert("RGB"),
               prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"], width=W, height=H,
               num_inference_steps=ref["steps"], guidance_scale=ref["guidance"], output_type="latent",
               controlnet_conditioning_scale=canny["scale"], control_guidance_end=canny["end"]).images
save_file({"out": out.contiguous()}, OUT / "ip-golden.safetensors")
(OUT / "ip-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "scale": SCALE,
}, indent=2) + "\n")
print("wrote ip-golden.safetensors", tuple(out.shape))
