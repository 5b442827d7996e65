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
- `control/lora-bfl.safetensors`: a tiny Control LoRA in BFL's layout (as
  `flux1-canny-dev-lora.safetensors`) for the plain tiny Flux of
  make_flux_fixtures.py: `img_in` widened to 128 input channels, LoRA
  biases (`lora_B.bias`), and every QK-norm scale replaced outright.
- `control/lora-peft.safetensors`: the same under diffusers/PEFT names (Q/K/V
  and the single blocks' linear1 split, the final modulation's halves swapped
  in `lora_B` only; diffusers' own BFL-control converter, which also swaps
  `lora_A`'s rows, is not used: it is written for FLUX.1's sizes).
- `control/lora-golden.safetensors`: `out.t2i` from `FluxControlPipeline` with
  the plain tiny Flux and the PEFT file loaded by diffusers' `load_lora_weights`
  at adapter weight 0.75 (the input layer widened, the norms replaced).
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
flux_pipelines.capture_conditioning(transformer, gold)
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

# The Control LoRA, in BFL's layout, then under diffusers' names.
torch.manual_seed(72)
HID, MLP, HEAD, DOUBLE, SINGLE, LORA_STRENGTH = 48, 192, 16, 2, 3, 0.75
bfl = {}


def lora(name, rank, inp, out):
    bfl[f"{name}.lora_A.weight"] = torch.randn(rank, inp) / inp ** 0.5
    bfl[f"{name}.lora_B.weight"] = torch.randn(out, rank) * 0.3 / rank ** 0.5
    bfl[f"{name}.lora_B.bias"] = 0.05 * torch.randn(out)


lora("img_in", 4, 128, HID)
lora("time_in.in_layer", 2, 256, HID)
lora("double_blocks.0.img_attn.qkv", 4, HID, 3 * HID)
lora("double_blocks.0.img_mod.lin", 2, HID, 6 * HID)
lora("double_blocks.1.txt_mlp.0", 3, HID, MLP)
lora("single_blocks.0.linear1", 4, HID, 3 * HID + MLP)
lora("single_blocks.1.linear2", 2, HID + MLP, HID)
lora("final_layer.linear", 2, HID, 64)
lora("final_layer.adaLN_modulation.1", 2, HID, 2 * HID)
norms = [f"double_blocks.{i}.{s}_attn.norm.{n}_norm.scale" for i in range(DOUBLE) for s in ("img", "txt")
         for n in ("query", "key")] + [f"single_blocks.{i}.norm.{n}_norm.scale" for i in range(SINGLE) for n in ("query", "key")]
for n in norms:
    bfl[n] = 1.0 + 0.2 * torch.randn(HEAD)
save_file(bfl, OUT / "lora-bfl.safetensors")

peft_sd = {}


def put(dst, src, rows=None, swap=False):
    """`src`'s LoRA as diffusers module(s) `dst`: split in `rows` (lora_A shared), or halves swapped."""
    a, b, bias = (bfl[f"{src}.lora_A.weight"], bfl[f"{src}.lora_B.weight"], bfl[f"{src}.lora_B.bias"])
    if swap:
        b, bias = torch.cat(b.chunk(2)[::-1]), torch.cat(bias.chunk(2)[::-1])
    dsts, rows = (dst, rows) if rows else ([dst], [b.shape[0]])
    for d, bp, biasp in zip(dsts, b.split(rows), bias.split(rows)):
        peft_sd[f"transformer.{d}.lora_A.weight"] = a.clone()
        peft_sd[f"transformer.{d}.lora_B.weight"] = bp.clone()
        peft_sd[f"transformer.{d}.lora_B.bias"] = biasp.clone()


put("x_embedder", "img_in")
put("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
put([f"transformer_blocks.0.attn.to_{x}" for x in "qkv"], "double_blocks.0.img_attn.qkv", [HID, HID, HID])
put("transformer_blocks.0.norm1.linear", "double_blocks.0.img_mod.lin")
put("transformer_blocks.1.ff_context.net.0.proj", "double_blocks.1.txt_mlp.0")
put([f"single_transformer_blocks.0.{x}" for x in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")],
    "single_blocks.0.linear1", [HID, HID, HID, MLP])
put("single_transformer_blocks.1.proj_out", "single_blocks.1.linear2")
put("proj_out", "final_layer.linear")
put("norm_out.linear", "final_layer.adaLN_modulation.1", swap=True)
for n in norms:
    i = n.split(".")[1]
    if n.startswith("double"):
        side = "" if ".img_attn." in n else "added_"
        d = f"transformer_blocks.{i}.attn.norm_{side}{'q' if 'query' in n else 'k'}.weight"
    else:
        d = f"single_transformer_blocks.{i}.attn.norm_{'q' if 'query' in n else 'k'}.weight"
    peft_sd[f"transformer.{d}"] = bfl[n].clone()
save_file(peft_sd, OUT / "lora-peft.safetensors")

base = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxControlPipeline, base, vae)
pipe.load_lora_weights(load_file(OUT / "lora-peft.safetensors"), adapter_name="control")
pipe.set_adapters(["control"], adapter_weights=[LORA_STRENGTH])
assert base.config.in_channels == 128 and base.x_embedder.in_features == 128, "the input layer was not widened"
with torch.no_grad():
    lora_gold = {"out.t2i": pipe(**common).images}
save_file({k: v.contiguous() for k, v in lora_gold.items()}, OUT / "lora-golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__,
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strength": STRENGTH, "inpaint_strength": INPAINT_STRENGTH,
    "lora_strength": LORA_STRENGTH,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
