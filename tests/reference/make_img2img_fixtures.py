#!/usr/bin/env python3
"""Image-to-image fixtures: a tiny whole Flux VAE (encoder and decoder) in both
layouts, an init image, and goldens from diffusers' `FluxImg2ImgPipeline`.

Run after make_flux_fixtures.py, with `pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_img2img_fixtures.py

- `img2img/ae.safetensors`: BFL's `ae.safetensors` layout, encoder and decoder
  (f16; one resnet a level in the encoder, two in the decoder, as BFL's
  `num_res_blocks` = 1 gives; four levels, so 8× down like FLUX.1's VAE).
- `img2img/vae/`: the same weights as a diffusers `AutoencoderKL` folder,
  converted by diffusers' own `convert_ldm_vae_checkpoint`.
- `img2img/init.png`: a 96×64 picture drawn here.
- `img2img/golden.safetensors`:
  - `lanczos.WxH`: init.png resized by Pillow's `Image.resize(..., LANCZOS)`,
    which diffusers' `VaeImageProcessor` uses to fit an init image;
  - `encode.latents`: the VAE's encoding of init.png, `(mode - shift) · scale`
    (the distribution's mean: deterministic, where diffusers samples it by default);
  - `pipe.noise`, `pipe.prompt_embeds`, `pipe.pooled`: the pipeline's inputs;
  - `pipe.latents.S`: `FluxImg2ImgPipeline`'s final packed latents at strength S,
    with the tiny Flux of `flux/transformer`, FLUX.1-dev's scheduler config,
    its noise replaced by `pipe.noise` and its VAE encoding by the mean;
  - `pipe.decoded.S`: those latents decoded by the VAE.
"""
import json
from pathlib import Path

import diffusers
import numpy as np
import PIL
import torch
from diffusers import AutoencoderKL, FluxImg2ImgPipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from diffusers.pipelines.flux import pipeline_flux_img2img
from PIL import Image
from safetensors.torch import save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "img2img"
OUT.mkdir(exist_ok=True)
torch.manual_seed(21)

# ---------------------------------------------------------------- the VAE, BFL layout
CH, CH_MULT, NRB, Z = 32, [1, 1, 1, 2], 1, 16
SCALE, SHIFT = 0.3611, 0.1159
ae = {}


def conv(name, cin, cout, k=3):
    ae[name + ".weight"] = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    ae[name + ".bias"] = 0.05 * torch.randn(cout)


def norm(name, c):
    ae[name + ".weight"] = 1 + 0.1 * torch.randn(c)
    ae[name + ".bias"] = 0.05 * torch.randn(c)


def resnet(name, cin, cout):
    norm(name + ".norm1", cin)
    conv(name + ".conv1", cin, cout)
    norm(name + ".norm2", cout)
    conv(name + ".conv2", cout, cout)
    if cin != cout:
        conv(name + ".nin_shortcut", cin, cout, 1)


def mid(prefix, c):
    resnet(prefix + ".mid.block_1", c, c)
    norm(prefix + ".mid.attn_1.norm", c)
    for n in "qkv":
        conv(f"{prefix}.mid.attn_1.{n}", c, c, 1)
    conv(prefix + ".mid.attn_1.proj_out", c, c, 1)
    resnet(prefix + ".mid.block_2", c, c)


# Encoder (BFL's `Encoder`): conv_in, per level NRB resnets then a stride-2 conv (not after the last).
conv("encoder.conv_in", 3, CH)
block_in = CH
for level, mult in enumerate(CH_MULT):
    block_in = CH * ([1] + CH_MULT)[level]
    for b in range(NRB):
        resnet(f"encoder.down.{level}.block.{b}", block_in, CH * mult)
        block_in = CH * mult
    if level != len(CH_MULT) - 1:
        conv(f"encoder.down.{level}.downsample.conv", block_in, block_in)
mid("encoder", block_in)
norm("encoder.norm_out", block_in)
conv("encoder.conv_out", block_in, 2 * Z)

# Decoder (BFL's `Decoder`): NRB + 1 resnets a level, levels from the deepest.
block_in = CH * CH_MULT[-1]
conv("decoder.conv_in", Z, block_in)
mid("decoder", block_in)
for level in reversed(range(len(CH_MULT))):
    for b in range(NRB + 1):
        resnet(f"decoder.up.{level}.block.{b}", block_in, CH * CH_MULT[level])
        block_in = CH * CH_MULT[level]
    if level != 0:
        conv(f"decoder.up.{level}.upsample.conv", block_in, block_in)
norm("decoder.norm_out", block_in)
conv("decoder.conv_out", block_in, 3)
ae = {k: v.half() for k, v in ae.items()}
save_file(ae, OUT / "ae.safetensors")

vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=Z, block_out_channels=[CH * m for m in CH_MULT],
               down_block_types=["DownEncoderBlock2D"] * len(CH_MULT),
               up_block_types=["UpDecoderBlock2D"] * len(CH_MULT), layers_per_block=NRB, norm_num_groups=32,
               scaling_factor=SCALE, shift_factor=SHIFT, use_quant_conv=False, use_post_quant_conv=False)
vae = AutoencoderKL(**vae_cfg).eval()
converted = convert_ldm_vae_checkpoint({k: v.float() for k, v in ae.items()}, vae_cfg)
assert set(converted) == set(vae.state_dict()), sorted(set(converted) ^ set(vae.state_dict()))[:10]
vae.load_state_dict(converted)
vae.half().save_pretrained(OUT / "vae")
vae = flux_pipelines.vae(OUT / "vae")

# ---------------------------------------------------------------- init image
W, H = 96, 64
yy, xx = np.mgrid[0:H, 0:W].astype(np.float64)
rgb = np.stack([
    128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
    40 + 180 * xx / W,
    220 - 150 * yy / H,
], axis=-1)
disc = (xx - 60) ** 2 + (yy - 28) ** 2 < 18 ** 2
rgb[disc] = [230, 200, 40]
rgb[(xx // 8 + yy // 8) % 2 == 0] *= 0.85
img = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
img.save(OUT / "init.png", optimize=False)
img = Image.open(OUT / "init.png").convert("RGB")

gold = {}
for w, h in [(80, 48), (128, 96), (96, 64)]:
    gold[f"lanczos.{w}x{h}"] = torch.from_numpy(np.asarray(img.resize((w, h), Image.LANCZOS)).copy())

pixels = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0).permute(2, 0, 1)[None] * 2 - 1
with torch.no_grad():
    gold["encode.latents"] = (vae.encode(pixels).latent_dist.mode() - SHIFT) * SCALE

# ---------------------------------------------------------------- the img2img pipeline
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
pipe = flux_pipelines.pipeline(FluxImg2ImgPipeline, transformer, vae)
noise = torch.randn(1, Z, H // 8, W // 8)
prompt_embeds = torch.randn(1, 7, transformer.config.joint_attention_dim)
pooled = torch.randn(1, transformer.config.pooled_projection_dim)
gold["pipe.noise"], gold["pipe.prompt_embeds"], gold["pipe.pooled"] = noise, prompt_embeds, pooled
# The pipeline's own noise and VAE sampling replaced by ours (and the distribution's mean).
pipeline_flux_img2img.randn_tensor = lambda shape, **_: noise.clone()
pipeline_flux_img2img.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()
STEPS, GUIDANCE = 6, 3.5
STRENGTHS = [0.6, 0.95]
for s in STRENGTHS:
    with torch.no_grad():
        latents = pipe(image=img, prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, width=W, height=H,
                       strength=s, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="latent").images
        unpacked = pipe._unpack_latents(latents, H, W, pipe.vae_scale_factor)
        decoded = vae.decode(unpacked / SCALE + SHIFT).sample
    gold[f"pipe.latents.{s}"] = latents
    gold[f"pipe.decoded.{s}"] = decoded

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "pillow": PIL.__version__,
    "vae": {"ch": CH, "ch_mult": CH_MULT, "num_res_blocks": NRB, "z_channels": Z, "scale_factor": SCALE,
            "shift_factor": SHIFT},
    "image": [W, H], "steps": STEPS, "guidance": GUIDANCE, "strengths": STRENGTHS,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
