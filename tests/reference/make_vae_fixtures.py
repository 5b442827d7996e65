#!/usr/bin/env python3
"""The tiny Flux VAE of make_pipeline_fixtures.py as a diffusers `vae/` folder
(`AutoencoderKL.save_pretrained`: config.json + diffusion_pytorch_model.safetensors),
the layout diffusers-format Flux repos ship instead of BFL's `ae.safetensors`.

Run after make_pipeline_fixtures.py, with `pip install torch diffusers safetensors`:
    python3 tests/reference/make_vae_fixtures.py

The decoder is `pipeline/ae.safetensors` converted by diffusers' own LDM→diffusers
converter (`convert_ldm_vae_checkpoint`); the encoder half (which ipaflux does not
load) is diffusers' seeded initialisation. Its decode of the golden latents is
checked against `pipeline/golden.safetensors`' `vae.decoded`, so both VAE
layouts share one golden. Kept apart from make_pipeline_fixtures.py so this
folder can be remade without remaking the tokenizer fixtures (whose files the
`tokenizers` version changes).
"""
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "pipeline"
ref = json.loads((OUT / "reference.json").read_text())["vae"]
torch.manual_seed(11)
cfg = dict(in_channels=3, out_channels=3, latent_channels=ref["z_channels"],
           block_out_channels=[ref["ch"] * m for m in ref["ch_mult"]],
           down_block_types=["DownEncoderBlock2D"] * len(ref["ch_mult"]),
           up_block_types=["UpDecoderBlock2D"] * len(ref["ch_mult"]), layers_per_block=ref["num_res_blocks"],
           norm_num_groups=32, scaling_factor=ref["scale_factor"], shift_factor=ref["shift_factor"],
           use_quant_conv=False, use_post_quant_conv=False)
vae = AutoencoderKL(**cfg).eval()
ae = load_file(OUT / "ae.safetensors")
converted = convert_ldm_vae_checkpoint({k: v.float() for k, v in ae.items()}, cfg)
missing, unexpected = vae.load_state_dict(converted, strict=False)
assert not unexpected and all(k.startswith("encoder.") for k in missing), (unexpected, missing[:5])
vae = vae.half()
vae.save_pretrained(OUT / "vae")

gold = load_file(OUT / "golden.safetensors")
check = AutoencoderKL.from_pretrained(OUT / "vae", torch_dtype=torch.float32).eval()
with torch.no_grad():
    out = check.decode(gold["vae.latents"] / ref["scale_factor"] + ref["shift_factor"]).sample
rel = ((out - gold["vae.decoded"]).abs().max() / gold["vae.decoded"].abs().max()).item()
assert rel < 1e-5, rel
print(f"wrote {OUT / 'vae'}; decode vs golden: {rel:.2e}")
