#!/usr/bin/env python3
"""FLUX.1 Redux fixtures: a tiny random Redux image embedder for the tiny
SigLIP (32 wide) and the tiny Flux (64-wide text tokens), with goldens from
diffusers' `FluxPriorReduxPipeline` and `FluxPipeline`.

Run after make_fixtures.py, make_flux_fixtures.py and make_img2img_fixtures.py
(whose VAE folder `FluxPipeline` needs for its sizes), with
`pip install torch transformers diffusers safetensors pillow`:
    python3 tests/reference/make_redux_fixtures.py

- `redux/flux1-redux-tiny.safetensors`: BFL's `flux1-redux-dev.safetensors`
  names (`redux_up`, `redux_down`), f32.
- `redux/image_embedder/`: the same weights as diffusers'
  `ReduxImageEncoder.save_pretrained`, beside a `model_index.json` (the
  FLUX.1-Redux-dev repo's layout).
- `redux/golden.safetensors`:
  - `siglip_tokens`: SigLIP's `last_hidden_state` of images/photo.jpg, as the
    prior pipeline's `encode_image` computes it (its SiglipImageProcessor);
  - `tokens`: the pipeline's `image_embedder` output for them;
  - `prompt_embeds`, `pooled`, `latents`: sampling inputs;
  - `out`: `FluxPipeline`'s final packed latents with the prompt's tokens
    followed by the Redux tokens × `strength` (ComfyUI's StyleModelApply,
    "multiply"), FLUX.1-dev's scheduler config.
"""
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import FluxPipeline, FluxPriorReduxPipeline
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipImageProcessor, SiglipVisionModel

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "redux"
OUT.mkdir(exist_ok=True)
torch.manual_seed(41)

siglip = SiglipVisionModel.from_pretrained(ROOT / "siglip-vision", torch_dtype=torch.float32).eval()
processor = SiglipImageProcessor.from_pretrained(ROOT / "siglip-vision")
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
CTX, POOLED = transformer.config.joint_attention_dim, transformer.config.pooled_projection_dim

redux = ReduxImageEncoder(redux_dim=siglip.config.hidden_size, txt_in_features=CTX).eval()
with torch.no_grad():
    for name, p in redux.named_parameters():
        p.copy_(0.05 * torch.randn_like(p) if p.ndim == 1 else torch.randn_like(p) / p.shape[1] ** 0.5)
redux.save_pretrained(OUT / "image_embedder")
# The FLUX.1-Redux-dev repo's pipeline index (its SigLIP parts are this repo's siglip-vision fixture).
(OUT / "model_index.json").write_text(json.dumps({
    "_class_name": "FluxPriorReduxPipeline", "_diffusers_version": diffusers.__version__,
    "feature_extractor": ["transformers", "SiglipImageProcessor"],
    "image_embedder": ["flux", "ReduxImageEncoder"], "image_encoder": ["transformers", "SiglipVisionModel"],
}, indent=2) + "\n")
save_file({k: v.contiguous() for k, v in redux.state_dict().items()}, OUT / "flux1-redux-tiny.safetensors")

prior = FluxPriorReduxPipeline(image_encoder=siglip, feature_extractor=processor, image_embedder=redux)
image = Image.open(ROOT / "images" / "photo.jpg")
STRENGTH = 0.8
gold = {}
with torch.no_grad():
    gold["siglip_tokens"] = prior.encode_image(image, "cpu", 1)
    gold["tokens"] = prior.image_embedder(gold["siglip_tokens"]).image_embeds

pipe = flux_pipelines.pipeline(FluxPipeline, transformer, flux_pipelines.vae(ROOT / "img2img" / "vae"))
W, H, STEPS, GUIDANCE = 64, 48, 3, 3.5
gold["prompt_embeds"] = torch.randn(1, 7, CTX)
gold["pooled"] = torch.randn(1, POOLED)
gold["latents"] = torch.randn(1, (H // 16) * (W // 16), 64)
with torch.no_grad():
    gold["out"] = pipe(prompt_embeds=torch.cat([gold["prompt_embeds"], STRENGTH * gold["tokens"]], dim=1),
                       pooled_prompt_embeds=gold["pooled"], latents=gold["latents"].clone(), width=W, height=H,
                       num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strength": STRENGTH,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
