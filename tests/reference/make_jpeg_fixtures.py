#!/usr/bin/env python3
"""JPEG decoder fixtures: small JPEGs covering the coding modes Pillow writes
(baseline and progressive; 4:4:4, 4:2:2, 4:2:0, 4:1:1 and grey; restart
intervals; odd and tiny sizes; low quality for clipping) and Pillow's own
decoded RGB for each (libjpeg-turbo's default decode), which our decoder must
reproduce byte for byte.

    python3 tests/reference/make_jpeg_fixtures.py   # needs pillow, numpy, safetensors
"""
import io
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "jpeg"
OUT.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(7)


def picture(h, w):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 7.0) * np.cos(y / 5.0)
    g = 255 * (x / max(w - 1, 1))
    b = np.where((x // 6 + y // 6) % 2 == 0, 240.0, 15.0)  # sharp edges: ringing and clipping
    img = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


CASES = {
    "q95_420_odd": (dict(quality=95), (45, 67), "RGB"),
    "q75_444": (dict(quality=75, subsampling=0), (40, 51), "RGB"),
    "q75_422": (dict(quality=75, subsampling=1), (33, 70), "RGB"),
    "q75_411": (dict(quality=75, subsampling="4:1:1"), (30, 77), "RGB"),
    "q10_420_clip": (dict(quality=10), (48, 64), "RGB"),
    "progressive_420": (dict(quality=85, progressive=True), (61, 83), "RGB"),
    "progressive_444_optimized": (dict(quality=90, subsampling=0, progressive=True, optimize=True), (37, 29), "RGB"),
    "gray": (dict(quality=80), (35, 47), "L"),
    "gray_progressive": (dict(quality=60, progressive=True), (24, 40), "L"),
    "restart_420": (dict(quality=80, restart_marker_blocks=3), (50, 66), "RGB"),
    "restart_progressive": (dict(quality=80, restart_marker_rows=1, progressive=True), (41, 57), "RGB"),
    "tiny_1x1": (dict(quality=90), (1, 1), "RGB"),
    "narrow_2x9": (dict(quality=90), (9, 2), "RGB"),
    "wide_3x130": (dict(quality=70), (3, 130), "RGB"),
}

decoded = {}
for name, (opts, (h, w), mode) in CASES.items():
    img = Image.fromarray(picture(h, w))
    if mode == "L":
        img = img.convert("L")
    buf = io.BytesIO()
    img.save(buf, "JPEG", **opts)
    (OUT / f"{name}.jpg").write_bytes(buf.getvalue())
    back = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    decoded[name] = np.asarray(back, dtype=np.uint8).copy()

save_file(decoded, str(OUT / "decoded.safetensors"),
          metadata={"pillow": PIL.__version__, "libjpeg_turbo": str(features.version("libjpeg_turbo"))})
print(f"{len(CASES)} JPEGs; Pillow {PIL.__version__}, libjpeg-turbo {features.version('libjpeg_turbo')}")
