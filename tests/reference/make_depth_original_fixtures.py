#!/usr/bin/env python3
"""Depth Anything V2 fixtures in the original repository's layout: the
`.pth` files ComfyUI's DepthAnythingV2Preprocessor (comfyui_controlnet_aux)
loads (`depth_anything_v2_vits.pth`, ..., `depth_anything_v2_metric_hypersim_vitl.pth`),
with goldens from that repository's own code.

The code is not on PyPI: give a checkout of
https://github.com/DepthAnything/Depth-Anything-V2 (Apache-2.0; these goldens
were made at a561b849ebae10a6f5ef49e26c83cbbcd36c71bf):

    pip install torch opencv-python-headless pillow safetensors numpy
    DEPTH_ANYTHING_V2=/path/to/Depth-Anything-V2 python3 tests/reference/make_depth_original_fixtures.py

(torchvision is only imported there for `Compose`; a stand-in is used when it is missing.)

- `depth/original/depth_anything_v2_tiny.pth`: `torch.save` of a relative-depth
  `DepthAnythingV2` state dict, built by the repository's classes: its
  `DinoVisionTransformer` made tiny (64 wide: one head of DINOv2's 64, 12
  layers so the 'vits' layer indices 2, 5, 8, 11 apply, MLP ratio 2, trained
  at 518 as the real ones) and its
  `DPTHead` (features 16, out_channels 8/16/32/32).
- `depth/original/depth_anything_v2_metric_hypersim_tiny_fp16.safetensors`: the
  same from `metric_depth/` (sigmoid head × max_depth 20, the Hypersim models'),
  its weights rounded to f16 and saved as safetensors in the same names, as the
  f16 conversions ComfyUI users also load; the goldens use the rounded weights.
- `depth/original/golden.safetensors`: for each image NAME (read at the input
  size IMAGES gives) and model M: `NAME.pixel_values` (`image2tensor`:
  lower-bound resize to the input size and a multiple of 14 with OpenCV's
  cubic on the f64 image, ImageNet normalisation), `M.NAME.predicted_depth`
  (`forward`), `M.NAME.depth` (`infer_image`: bilinear with aligned corners
  back to the image's size) and `M.NAME.map` (ComfyUI's 8-bit map of it:
  min-max × 255 truncated, and for a metric model 255 minus that; as f32).
  The square image keeps only `depth` and `map`. Images are decoded by Pillow
  and given as ComfyUI gives them (RGB → BGR, which `image2tensor` turns back).
- `depth/original/square.png`: the middle 96×96 of images/photo.jpg.
- `depth/original/reference.json`: the images with their input sizes, and the models' files.
"""
import json
import os
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import random_weights

UPSTREAM = Path(os.environ.get("DEPTH_ANYTHING_V2", ""))
if not (UPSTREAM / "depth_anything_v2" / "dpt.py").is_file():
    sys.exit("set DEPTH_ANYTHING_V2 to a checkout of github.com/DepthAnything/Depth-Anything-V2")
try:
    import torchvision.transforms  # noqa: F401
except ImportError:
    # dpt.py imports torchvision only for Compose.
    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for s in self.steps:
                x = s(x)
            return x

    tv = types.ModuleType("torchvision")
    tv.transforms = types.ModuleType("torchvision.transforms")
    tv.transforms.Compose = Compose
    sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "depth" / "original"
OUT.mkdir(parents=True, exist_ok=True)
# Each image with the input size it is read at (ComfyUI's node: 518; smaller keeps
# the goldens small), and whether its inputs and raw outputs are kept. The square
# one at 518 takes DINOv2's path that leaves the position embeddings as trained.
IMAGES = {"photo": ("images/photo.jpg", 140, True), "alpha": ("images/alpha.png", 154, True),
          "square": ("depth/original/square.png", 518, False)}
# The square one: the photo's middle 96×96, as a PNG.
Image.open(ROOT / "images/photo.jpg").convert("RGB").crop((32, 0, 128, 96)).save(OUT / "square.png")


def upstream(sub):
    """The repository's `depth_anything_v2` package under `sub` (relative or metric), freshly imported."""
    for name in [m for m in sys.modules if m == "depth_anything_v2" or m.startswith("depth_anything_v2.")]:
        del sys.modules[name]
    sys.path.insert(0, str(UPSTREAM / sub))
    try:
        import depth_anything_v2.dpt as dpt
        import depth_anything_v2.dinov2 as dinov2
    finally:
        sys.path.pop(0)
    return dpt, dinov2


def tiny(sub, seed, **kw):
    dpt, dinov2 = upstream(sub)
    torch.manual_seed(seed)
    m = dpt.DepthAnythingV2(encoder="vits", features=16, out_channels=[8, 16, 32, 32], **kw)
    # The same classes, 64 wide: what DINOv2(model_name="vits") builds, with embed_dim 384 and 6 heads.
    m.pretrained = dinov2.DinoVisionTransformer(img_size=518, patch_size=14, embed_dim=64, depth=12, num_heads=1,
                                                mlp_ratio=2, init_values=1.0, ffn_layer="mlp", block_chunks=0,
                                                num_register_tokens=0, interpolate_antialias=False,
                                                interpolate_offset=0.1)
    m.depth_head = dpt.DPTHead(64, 16, False, out_channels=[8, 16, 32, 32])
    m.eval()
    random_weights.fill(m, ".gamma")
    with torch.no_grad():
        # A positive output bias, so the relative head's ReLU leaves a depth to see.
        m.depth_head.scratch.output_conv2[2].bias.fill_(0.5)
    return m


gold = {}
models = {"model": ("depth_anything_v2_tiny.pth", "", 101, {}),
          "metric": ("depth_anything_v2_metric_hypersim_tiny_fp16.safetensors", "metric_depth", 102,
                     {"max_depth": 20.0})}
for key, (file, sub, seed, kw) in models.items():
    m = tiny(sub, seed, **kw)
    if file.endswith(".pth"):
        torch.save(m.state_dict(), OUT / file)
    else:
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
        save_file({k: v.half().contiguous() for k, v in m.state_dict().items()}, OUT / file)
    for image, (rel, size, keep) in IMAGES.items():
        rgb = np.array(Image.open(ROOT / rel).convert("RGB"))
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
        with torch.no_grad():
            pixels, _ = m.image2tensor(bgr, size)
            predicted = m.forward(pixels)
            depth = m.infer_image(bgr, size)
        depth_map = ((depth - depth.min()) / (depth.max() - depth.min()) * 255.0).astype(np.uint8)
        if "metric" in file:
            depth_map = 255 - depth_map
        if keep:
            gold[f"{image}.pixel_values"] = pixels.float().contiguous()
            gold[f"{key}.{image}.predicted_depth"] = predicted.float().contiguous()
        gold[f"{key}.{image}.depth"] = torch.from_numpy(depth).float().contiguous()
        gold[f"{key}.{image}.map"] = torch.from_numpy(depth_map.astype(np.float32)).contiguous()
        print(key, image, tuple(pixels.shape), tuple(depth.shape), float(depth.min()), float(depth.max()))
save_file(gold, OUT / "golden.safetensors")
reference = {"images": {k: {"path": v[0], "input_size": v[1], "raw_outputs": v[2]} for k, v in IMAGES.items()},
             "models": {k: v[0] for k, v in models.items()}, "upstream": "DepthAnything/Depth-Anything-V2"}
(OUT / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
print("wrote", OUT)
