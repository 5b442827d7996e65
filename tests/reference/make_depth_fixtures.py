#!/usr/bin/env python3
"""Depth Anything fixtures: tiny random models in transformers' layout
(`DepthAnythingForDepthEstimation` with a DINOv2 backbone, as
depth-anything/Depth-Anything-V2-Small-hf and LiheYoung/depth-anything-large-hf
ship) and goldens from transformers' own code: `DPTImageProcessor` (PIL
backend), the model, `post_process_depth_estimation` (bicubic back to the
image's size), then the 8-bit map ComfyUI's and controlnet_aux's depth
preprocessors make of it (min-max scaled to 0..255, truncated).

Run with `pip install torch transformers safetensors pillow numpy`:
    python3 tests/reference/make_depth_fixtures.py

- `depth/model/`: `save_pretrained` of a relative-depth model (DINOv2 32 wide,
  4 layers, 2 heads, patch 14, trained size 70 so the position embeddings are
  interpolated; features of layers 1..4; neck 8/16/24/32, fusion 16, head 8)
  with a `preprocessor_config.json` at 98×98 (keep aspect ratio, multiple of
  14, ImageNet mean and std, as Depth Anything's files but smaller).
- `depth/metric/`: the same with a metric head (sigmoid × max_depth 20) and
  features of the embeddings (the stem) and layers 2..4.
- `depth/golden.safetensors`: for each image NAME and model M: `M.NAME.pixel_values`,
  `M.NAME.predicted_depth` (the model's output), `M.NAME.depth` (at the
  image's size) and `M.NAME.map` (the 8-bit map, as f32 0..255).
- `depth/model.photo.png`: the relative model's map of images/photo.jpg (8-bit gray).
"""
import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

import random_weights

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "depth"
OUT.mkdir(exist_ok=True)
IMAGES = {"photo": "images/photo.jpg", "alpha": "images/alpha.png", "gray": "images/gray.webp"}


def model(seed, out_indices, kind):
    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, mlp_ratio=4,
                            patch_size=14, image_size=70, out_indices=out_indices, reshape_hidden_states=False,
                            layerscale_value=1.0)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 24, 32],
                              fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=kind,
                              max_depth=20 if kind == "metric" else None)
    m = DepthAnythingForDepthEstimation(cfg).eval()
    random_weights.fill(m, "lambda1")
    with torch.no_grad():
        # A positive output bias, so the final ReLU leaves a depth to see.
        m.head.conv3.bias.fill_(0.5)
    return m


processor = DPTImageProcessorPil(size={"height": 98, "width": 98}, keep_aspect_ratio=True, ensure_multiple_of=14,
                                 image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                                 resample=3, do_pad=False)
gold = {}
for name, (seed, indices, kind) in {"model": (91, [1, 2, 3, 4], "relative"),
                                    "metric": (92, [0, 2, 3, 4], "metric")}.items():
    m = model(seed, indices, kind)
    m.save_pretrained(OUT / name)
    processor.save_pretrained(OUT / name)
    for image, rel in IMAGES.items():
        pil = Image.open(ROOT / rel).convert("RGB")
        pixels = processor(pil, return_tensors="pt").pixel_values
        with torch.no_grad():
            out = m(pixel_values=pixels)
        depth = processor.post_process_depth_estimation(out, target_sizes=[(pil.height, pil.width)])[0]["predicted_depth"]
        d = depth.numpy()
        mapped = ((d - d.min()) / (d.max() - d.min()) * 255.0).astype(np.uint8)
        gold[f"{name}.{image}.pixel_values"] = pixels
        gold[f"{name}.{image}.predicted_depth"] = out.predicted_depth
        gold[f"{name}.{image}.depth"] = depth
        gold[f"{name}.{image}.map"] = torch.from_numpy(mapped.astype(np.float32))
        if name == "model" and image == "photo":
            Image.fromarray(mapped, "L").save(OUT / "model.photo.png", optimize=False)
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "images": IMAGES,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
for k, v in gold.items():
    if k.endswith("predicted_depth"):
        print(k, tuple(v.shape), float(v.min()), float(v.max()))
