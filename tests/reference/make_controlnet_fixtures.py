#!/usr/bin/env python3
"""Flux ControlNet fixtures (InstantX's and Shakker-Labs' ControlNets, which
diffusers loads as `FluxControlNetModel`): two tiny random ControlNets in
diffusers' layout and goldens from diffusers' `FluxControlNetPipeline`.

Run after make_img2img_fixtures.py and make_control_fixtures.py (their VAE,
noise, embeddings and control image), with
`pip install torch diffusers safetensors pillow numpy`:
    python3 tests/reference/make_controlnet_fixtures.py

- `controlnet/canny/`: `FluxControlNetModel.save_pretrained` (bf16) with the
  tiny Flux's sizes, 1 double block and 2 single blocks (the tiny Flux has 2
  and 3, so one ControlNet block feeds several Flux blocks, as InstantX's 5
  and 10 feed FLUX.1's 19 and 38) and a guidance embedding, like
  InstantX/FLUX.1-dev-Controlnet-Canny.
- `controlnet/union/`: 2 double blocks, no single blocks, no guidance
  embedding, and a control-mode embedding of 10 modes, like the Union
  ControlNets (InstantX's, Shakker-Labs' Union-Pro).
- `controlnet/xlabs/`: XLabs' kind (as XLabs-AI/flux-controlnet-canny-diffusers):
  2 double blocks whose residuals feed Flux's double blocks in turn
  (`controlnet_blocks_repeat`), a guidance embedding, and a hint block of
  convolutions that reads the control image's pixels (not its latents);
  `controlnet/xlabs-original.safetensors`: the same net in XLabs' own layout
  (x-flux's `ControlNetFlux`, as ComfyUI loads `flux-canny-controlnet-v3`):
  BFL's block names, `input_hint_block.0..14`, `pos_embed_input` (bf16).
- `controlnet/golden.safetensors`:
  - `cond`: the packed control latents (control/control.png fitted to 96×64);
  - `canny.double.N`, `canny.single.N`: the Canny net's residuals at the first
    step of its window (conditioning scale applied), for the latents `canny.x`
    at sigma `canny.sigma`; `union.*` the Union net's;
  - `out.canny`: the final packed latents with the Canny net at
    conditioning scale 0.7, `control_guidance_end` 0.8 (img2img's noise and
    prompt, 6 steps, guidance 3.5);
  - `out.union`: the Union net in mode 2 (depth) at scale 0.9,
    `control_guidance_start` 0.2, with true CFG 2.0 against `negative.embeds`
    and `negative.pooled` (the prompt's embeddings times −0.5);
  - `pixels`: the control image as the XLabs net takes it (fitted, in [-1, 1]),
    `xlabs.double.N` its residuals, `out.xlabs` the final latents at scale 0.8;
  - `out.canny.img2img`: `FluxControlNetImg2ImgPipeline` with the Canny net
    as above, from img2img's init image at strength 0.6 (its window over the
    steps that run); `out.canny.inpaint`: `FluxControlNetInpaintPipeline`,
    the same with inpaint/mask.png at strength 0.8.
  The pipeline's VAE sampling is replaced by the distribution's mean (as
  generate encodes control images) and its noise by img2img's.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxControlNetImg2ImgPipeline, FluxControlNetInpaintPipeline, FluxControlNetPipeline
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.flux import (pipeline_flux_controlnet, pipeline_flux_controlnet_image_to_image,
                                      pipeline_flux_controlnet_inpainting)
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "controlnet"
OUT.mkdir(exist_ok=True)
torch.manual_seed(91)

random_controlnet = flux_pipelines.random_controlnet
canny = random_controlnet(OUT / "canny", num_layers=1, num_single_layers=2, guidance_embeds=True)
union = random_controlnet(OUT / "union", num_layers=2, num_single_layers=0, guidance_embeds=False, num_mode=10)
xlabs = random_controlnet(OUT / "xlabs", num_layers=2, num_single_layers=0, guidance_embeds=True,
                          conditioning_embedding_channels=16, patch_size=2)


def bfl_names(sd):
    """XLabs' own layout (x-flux's `ControlNetFlux`, as ComfyUI loads it) of a
    diffusers XLabs net: BFL's block names (Q, K, V concatenated), the hint
    block as an `nn.Sequential` (convolutions at 0, 2, ..., 14) and
    `pos_embed_input` for `controlnet_x_embedder`."""
    out, sd = {}, dict(sd)
    top = {"x_embedder": "img_in", "context_embedder": "txt_in", "controlnet_x_embedder": "pos_embed_input",
           "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "input_hint_block.conv_in": "input_hint_block.0", "input_hint_block.conv_out": "input_hint_block.14"}
    top.update({f"input_hint_block.blocks.{k}": f"input_hint_block.{2 * k + 2}" for k in range(6)})
    block = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
             "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
             "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
    norms = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
             "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
    for src, dst in top.items():
        for leaf in ("weight", "bias"):
            out[f"{dst}.{leaf}"] = sd.pop(f"{src}.{leaf}")
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for src, dst in block.items():
            for leaf in ("weight", "bias"):
                out[f"{q}{dst}.{leaf}"] = sd.pop(f"{p}{src}.{leaf}")
        for src, dst in norms.items():
            out[f"{q}{dst}.scale"] = sd.pop(f"{p}{src}.weight")
        for names, dst in ((("to_q", "to_k", "to_v"), "img_attn.qkv"),
                           (("add_q_proj", "add_k_proj", "add_v_proj"), "txt_attn.qkv")):
            for leaf in ("weight", "bias"):
                out[f"{q}{dst}.{leaf}"] = torch.cat([sd.pop(f"{p}attn.{n}.{leaf}") for n in names])
    out.update({k: sd.pop(k) for k in [k for k in sd if k.startswith("controlnet_blocks.")]})
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


save_file({k: v.to(torch.bfloat16).contiguous() for k, v in bfl_names(xlabs.state_dict()).items()},
          OUT / "xlabs-original.safetensors")

i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((ROOT / "img2img" / "reference.json").read_text())
W, H = ref["image"]
STEPS, GUIDANCE = ref["steps"], 3.5
vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
for module in (pipeline_flux_controlnet, pipeline_flux_controlnet_image_to_image, pipeline_flux_controlnet_inpainting):
    module.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
    module.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
vae = flux_pipelines.vae(ROOT / "img2img" / "vae")
gold = {}


def capture(net, name):
    """Records the net's inputs and residuals at its first call in its window
    (before it, its conditioning scale is 0), and the control latents it gets."""
    forward = net.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        if f"{name}.double.0" not in gold and kwargs["conditioning_scale"] != 0:
            gold["pixels" if name == "xlabs" else "cond"] = kwargs["controlnet_cond"].clone()
            gold[f"{name}.x"] = kwargs["hidden_states"].clone()
            gold[f"{name}.sigma"] = kwargs["timestep"].clone()
            for kind, samples in zip(("double", "single"), out):
                for i, s in enumerate(samples or []):
                    gold[f"{name}.{kind}.{i}"] = s.clone()
        return out

    net.forward = recording


def pipe(net, cls=FluxControlNetPipeline):
    return cls(scheduler=flux_pipelines.dev_scheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                  controlnet=net)


capture(canny, "canny")
capture(union, "union")
capture(xlabs, "xlabs")
control = Image.open(ROOT / "control" / "control.png").convert("RGB")
common = dict(control_image=control, prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
              width=W, height=H, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent")
gold["negative.embeds"] = -0.5 * i2i["pipe.prompt_embeds"]
gold["negative.pooled"] = -0.5 * i2i["pipe.pooled"]
with torch.no_grad():
    gold["out.canny"] = pipe(canny)(controlnet_conditioning_scale=0.7, control_guidance_end=0.8, **common).images
    gold["out.union"] = pipe(union)(
        controlnet_conditioning_scale=0.9, control_guidance_start=0.2, control_mode=2, true_cfg_scale=2.0,
        negative_prompt_embeds=gold["negative.embeds"], negative_pooled_prompt_embeds=gold["negative.pooled"],
        **common).images
    gold["out.xlabs"] = pipe(xlabs)(controlnet_conditioning_scale=0.8, **common).images
    init = Image.open(ROOT / "img2img" / "init.png").convert("RGB")
    gold["out.canny.img2img"] = pipe(canny, FluxControlNetImg2ImgPipeline)(
        image=init, strength=0.6, controlnet_conditioning_scale=0.7, control_guidance_end=0.8, **common).images
    gold["out.canny.inpaint"] = pipe(canny, FluxControlNetInpaintPipeline)(
        image=init, mask_image=Image.open(ROOT / "inpaint" / "mask.png"), strength=0.8,
        controlnet_conditioning_scale=0.7, control_guidance_end=0.8, **common).images
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "image": [W, H], "steps": STEPS,
    "guidance": GUIDANCE,
    "canny": {"scale": 0.7, "start": 0.0, "end": 0.8, "img2img_strength": 0.6, "inpaint_strength": 0.8},
    "union": {"scale": 0.9, "start": 0.2, "end": 1.0, "mode": 2, "true_cfg": 2.0},
    "xlabs": {"scale": 0.8, "start": 0.0, "end": 1.0},
}, indent=2) + "\n")
print({k: tuple(v.shape) for k, v in gold.items()})
