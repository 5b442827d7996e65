#!/usr/bin/env python3
"""Canny edge goldens from OpenCV's `cv2.Canny` (aperture 3, L1 gradient: its
defaults), called on the RGB image as controlnet_aux's `CannyDetector` does
for diffusers' FLUX.1 Canny examples.

Run with `pip install opencv-python-headless pillow numpy`:
    python3 tests/reference/make_canny_fixtures.py

`canny/NAME.LOW-HIGH.png`: the edge map (8-bit gray, 255 = edge) of fixture
image NAME (decoded by Pillow to RGB) at thresholds LOW and HIGH;
`canny/reference.json` lists them with the OpenCV version.
"""
import json
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "canny"
OUT.mkdir(exist_ok=True)

IMAGES = {"photo": "images/photo.jpg", "init": "img2img/init.png", "palette": "images/palette.png"}
THRESHOLDS = [(50, 200), (100, 200), (200, 50), (10, 30)]
cases = []
for name, rel in IMAGES.items():
    rgb = np.asarray(Image.open(ROOT / rel).convert("RGB"))
    for low, high in THRESHOLDS:
        edges = cv2.Canny(rgb, low, high)
        file = f"{name}.{low}-{high}.png"
        Image.fromarray(edges, "L").save(OUT / file, optimize=False)
        cases.append({"image": rel, "low": low, "high": high, "edges": file, "count": int((edges == 255).sum())})
(OUT / "reference.json").write_text(json.dumps({"opencv": cv2.__version__, "cases": cases}, indent=2) + "\n")
print("wrote", len(cases), "edge maps;", [c["count"] for c in cases])
