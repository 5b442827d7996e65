#!/usr/bin/env python3
"""Several Flux ControlNets at once: diffusers' `FluxControlNetPipeline` with a
`FluxMultiControlNetModel` (`generate --controlnet A --controlnet B` with a
control image each), on the tiny fixtures of make_controlnet_fixtures.py.

Run after it, with `pip install torch diffusers safetensors pillow`:
    python3 tests/reference/make_multi_controlnet_fixtures.py

- `controlnet/depth/`: a second random net of the Canny net's sizes (1 double
  and 2 single blocks, a guidance embedding): diffusers adds two nets'
  residual lists element by element, so it runs only nets of one size (ours
  also runs nets of different sizes, each mapped onto Flux by its own depth,
  as ComfyUI does).
- `controlnet/multi-golden.safetensors`:
  - `cond.0`, `cond.1`: the packed control latents of control/control.png and
    img2img/init.png (fitted to 96×64), as the nets get them;
  - `out.pair`: the final packed latents with the Canny net on control.png
    (scale 0.7, steps 0..0.8) and the depth net on init.png (scale 0.6,
    steps 0.2..1);
  - `out.union`: one Union net run twice (diffusers' Multi with one net, as
    Shakker-Labs' Union-Pro is shown): mode 0 on control.png (scale 0.5,
    steps 0..0.7) and mode 2 on init.png (scale 0.8, steps 0.3..1).
  img2img's noise and prompt, 6 steps, guidance 3.5; the VAE's mean, as
  generate encodes control images.
"""
import json
from pathlib import Path

import diffusers
import torch
from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel
from diffusers.models.autoencoders import vae as vae_module
from diffusers.pipelines.flux import pipeline_flux_controlnet
from PIL import Image
from safetensors.torch import load_file, save_file

import flux_pipelines

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "controlnet"
torch.manual_seed(97)
i2i = load_file(ROOT / "img2img" / "golden.safetensors")
ref = json.loads((OUT / "reference.json").read_text())
W, H = ref["image"]
vae_module.DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mode()
pipeline_flux_controlnet.randn_tensor = lambda shape, **_: i2i["pipe.noise"].clone()
pipeline_flux_controlnet.retrieve_latents = lambda out, generator=None, sample_mode="sample": out.latent_dist.mode()

canny = FluxControlNetModel.from_pretrained(OUT / "canny", torch_dtype=torch.float32).eval()
union = FluxControlNetModel.from_pretrained(OUT / "union", torch_dtype=torch.float32).eval()
depth = flux_pipelines.random_controlnet(OUT / "depth", num_layers=1, num_single_layers=2, guidance_embeds=True)
transformer = flux_pipelines.transformer(ROOT / "flux" / "transformer")
vae = flux_pipelines.vae(ROOT / "img2img" / "vae")
gold = {}


def capture(net):
    """Records the control latents each image gives at the net's first call."""
    forward = net.forward

    def recording(*args, **kwargs):
        if "cond.0" not in gold:
            for i, c in enumerate(kwargs["controlnet_cond"]):
                gold[f"cond.{i}"] = c.clone()
        return forward(*args, **kwargs)

    net.forward = recording


def pipe(nets):
    multi = FluxMultiControlNetModel(nets)
    capture(multi)
    return FluxControlNetPipeline(scheduler=flux_pipelines.dev_scheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                  controlnet=multi)


images = [Image.open(ROOT / "control" / "control.png").convert("RGB"),
          Image.open(ROOT / "img2img" / "init.png").convert("RGB")]
common = dict(control_image=images, prompt_embeds=i2i["pipe.prompt_embeds"], pooled_prompt_embeds=i2i["pipe.pooled"],
              width=W, height=H, num_inference_steps=ref["steps"], guidance_scale=ref["guidance"],
              output_type="latent")
PAIR = {"scale": [0.7, 0.6], "start": [0.0, 0.2], "end": [0.8, 1.0]}
UNION = {"scale": [0.5, 0.8], "start": [0.0, 0.3], "end": [0.7, 1.0], "mode": [0, 2]}
with torch.no_grad():
    gold["out.pair"] = pipe([canny, depth])(
        controlnet_conditioning_scale=PAIR["scale"], control_guidance_start=PAIR["start"],
        control_guidance_end=PAIR["end"], **common).images
    gold["out.union"] = pipe([union])(
        controlnet_conditioning_scale=UNION["scale"], control_guidance_start=UNION["start"],
        control_guidance_end=UNION["end"], control_mode=UNION["mode"], **common).images
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "multi-golden.safetensors")
(OUT / "multi-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "pair": PAIR, "union": UNION,
}, indent=2) + "\n")
print({k: tuple(v.shape) for k, v in gold.items()})
