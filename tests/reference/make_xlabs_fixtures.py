#!/usr/bin/env python3
"""XLabs' Flux IP-Adapter fixtures: a tiny random CLIP vision encoder
(transformers' `CLIPVisionModelWithProjection`), a tiny adapter in XLabs'
layout (`ip_adapter.safetensors` of XLabs-AI/flux-ip-adapter), and goldens
from diffusers' `FluxPipeline` with `load_ip_adapter` (its XLabs support) on
the tiny Flux of make_flux_fixtures.py.

Run after make_flux_fixtures.py and make_img2img_fixtures.py, with
`pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_xlabs_fixtures.py

- `xlabs/image_encoder/`: `save_pretrained` of the CLIP vision model (32×32
  images, patch 8, 2 layers, projection 24), f32, with the
  `preprocessor_config.json` of the `CLIPImageProcessor` diffusers makes for it
  (shortest edge 32, centre crop 32, CLIP's mean and std).
- `xlabs/ip_adapter.safetensors`: `ip_adapter_proj_model.{proj,norm}.*` (24 →
  4 tokens × 64, LayerNorm) and `double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*`
  (64 → 48) for the tiny Flux's 2 double blocks.
- `xlabs/golden.safetensors`: for `images/photo.jpg` (160×96: resized to 53×32,
  cropped to 32×32), `pixel_values` and `image_embeds` (the encoder's output),
  `latents` (the start noise) and `out`, the pipeline's final packed latents
  at IP scale 0.8 (img2img's embeddings, 64×48, 4 steps, guidance 3.5).
- `xlabs/clip-vision-single.safetensors`: another tiny CLIP vision model (128
  wide, 64-wide heads, transformers' own initialisation) as one file without
  config, as ComfyUI keeps `clip_vision_l.safetensors`; its `image_embeds`
  for the same photo in `xlabs/clip-vision-single-golden.safetensors`.
"""
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import FluxPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "xlabs"
OUT.mkdir(exist_ok=True)
torch.manual_seed(81)

# The image encoder (CLIP ViT-L/14's architecture at toy sizes).
clip_cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
clip = CLIPVisionModelWithProjection(clip_cfg).eval()
with torch.no_grad():
    for name, p in clip.named_parameters():
        if p.ndim == 1 and "norm" in name:
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
clip.save_pretrained(OUT / "image_encoder")
CLIPImageProcessor(size=32, crop_size=32).save_pretrained(OUT / "image_encoder")

# The adapter, in XLabs' names.
EMBED, TOKENS, CTX, HIDDEN, DOUBLE = 24, 4, 64, 48, 2
sd = {
    "ip_adapter_proj_model.proj.weight": torch.randn(TOKENS * CTX, EMBED) / EMBED ** 0.5,
    "ip_adapter_proj_model.proj.bias": 0.05 * torch.randn(TOKENS * CTX),
    "ip_adapter_proj_model.norm.weight": 1.0 + 0.1 * torch.randn(CTX),
    "ip_adapter_proj_model.norm.bias": 0.05 * torch.randn(CTX),
}
for i in range(DOUBLE):
    for kv in ("k", "v"):
        p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
        sd[f"{p}.weight"] = torch.randn(HIDDEN, CTX) / CTX ** 0.5
        sd[f"{p}.bias"] = 0.05 * torch.randn(HIDDEN)
save_file(sd, OUT / "ip_adapter.safetensors")

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
pipe.load_ip_adapter(str(OUT), weight_name="ip_adapter.safetensors",
                     image_encoder_pretrained_model_name_or_path=str(OUT / "image_encoder"),
                     image_encoder_dtype=torch.float32)
SCALE, W, H, STEPS, GUIDANCE = 0.8, 64, 48, 4, 3.5
pipe.set_ip_adapter_scale(SCALE)
gold = {"latents": torch.randn(1, (H // 16) * (W // 16), 64)}
photo = Image.open(ROOT / "images" / "photo.jpg").convert("RGB")
gold["pixel_values"] = pipe.feature_extractor(photo, return_tensors="pt").pixel_values
with torch.no_grad():
    gold["image_embeds"] = pipe.image_encoder(gold["pixel_values"]).image_embeds
    gold["out"] = pipe(prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
                       ip_adapter_image=photo, width=W, height=H, latents=gold["latents"].clone(),
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
    pipe.set_ip_adapter_scale(0.0)
    gold["out.scale0"] = pipe(prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
                              ip_adapter_image=photo, width=W, height=H, latents=gold["latents"].clone(),
                              num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "scale": SCALE,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))

# A CLIP vision model as a single file without config.json, as ComfyUI keeps
# `clip_vision_l.safetensors` (transformers' names; 64-wide heads, as OpenAI's).
torch.manual_seed(82)
single_cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
single = CLIPVisionModelWithProjection(single_cfg).eval()
save_file({k: v.contiguous() for k, v in single.state_dict().items()}, OUT / "clip-vision-single.safetensors")
with torch.no_grad():
    single_embeds = single(CLIPImageProcessor(size=32, crop_size=32)(photo, return_tensors="pt").pixel_values).image_embeds
save_file({"image_embeds": single_embeds.contiguous()}, OUT / "clip-vision-single-golden.safetensors")
print("wrote clip-vision-single.safetensors")
