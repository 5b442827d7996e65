#!/usr/bin/env python3
"""Builds the tiny random checkpoints, images and golden outputs in tests/fixtures/.

Run after `pip install torch transformers safetensors pillow` (torchvision optional):
    python3 tests/reference/make_fixtures.py

Everything is seeded, so a rerun reproduces the same files (up to library versions,
which are recorded in fixtures/reference.json). The goldens come from the upstream code:
transformers' SiglipVisionModel + SiglipImageProcessor, and the InstantX projection /
IP-processor math (MLPProjModel, IPAFluxAttnProcessor2_0) written out in PyTorch below.
"""
import io, json, os, struct, sys, zlib
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipConfig, SiglipModel, SiglipVisionConfig, SiglipVisionModel

OUT = Path(__file__).resolve().parent.parent / "fixtures"
torch.manual_seed(0)
rng = np.random.RandomState(0)

# ---------------------------------------------------------------- SigLIP (tiny, real layout)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=384, patch_size=14, num_channels=3)
TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16)

full = SiglipModel(SiglipConfig(text_config=TEXT, vision_config=VISION)).eval()
with torch.no_grad():
    for p in full.parameters():  # larger than default init so every layer matters
        p.copy_(torch.randn_like(p) * 0.2)
    for name, p in full.named_parameters():
        if "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + torch.randn_like(p) * 0.1)
full.save_pretrained(OUT / "siglip-full", max_shard_size="60KB")  # sharded, `vision_model.` prefix
vision = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
vision.load_state_dict(full.vision_model.state_dict())
vision.save_pretrained(OUT / "siglip-vision")  # single file, vision-only
for d in ("siglip-full", "siglip-vision"):
    (OUT / d / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5] * 3, "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}, indent=2))
    gen = OUT / d / "generation_config.json"
    if gen.exists():
        gen.unlink()

# ---------------------------------------------------------------- images
def smooth(h, w, c):
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    chans = [127 + 120 * np.sin(x / (7 + 5 * k) + y / (11 + 3 * k) + k) * np.cos(y / (9 + k)) for k in range(c)]
    noise = rng.randint(-12, 13, (h, w, c))
    return np.clip(np.stack(chans, -1) + noise, 0, 255)

def png16(path, arr):
    """16-bit PNG writer (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    ctype = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
    data += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(data)

IMG = OUT / "images"
IMG.mkdir(parents=True, exist_ok=True)
Image.fromarray(smooth(96, 160, 3).astype(np.uint8)).save(IMG / "photo.jpg", quality=95)
Image.fromarray(smooth(500, 700, 3).astype(np.uint8)).save(IMG / "wide.png")
Image.fromarray(smooth(200, 120, 4).astype(np.uint8), "RGBA").save(IMG / "alpha.png")
Image.fromarray(smooth(48, 64, 3).astype(np.uint8)).quantize(16).save(IMG / "palette.png")
Image.fromarray(smooth(70, 100, 1)[..., 0].astype(np.uint8), "L").save(IMG / "gray.webp", lossless=True)
png16(IMG / "gray16.png", (smooth(90, 90, 1)[..., 0] * 257).astype(np.uint16))
png16(IMG / "rgb16.png", (smooth(40, 50, 3) * 257 + rng.randint(0, 200, (40, 50, 3))).astype(np.uint16))
(IMG / "not-an-image.png").write_text("this is text, not a picture\n")

def load_rgb(path):
    """The RGB image the processor sees: Pillow's convert('RGB'), except 16-bit gray,
    which Pillow clips at 255 (whitening it); that one is scaled by 1/257 instead."""
    im = Image.open(path)
    if im.mode in ("I;16", "I;16B", "I"):
        a = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.round(a / 257), 0, 255).astype(np.uint8), "L")
    return im.convert("RGB")

from transformers.models.siglip import SiglipImageProcessorPil
proc = SiglipImageProcessorPil.from_pretrained(OUT / "siglip-vision")
try:
    from transformers import SiglipImageProcessor as FastProc
    fast = FastProc.from_pretrained(OUT / "siglip-vision")
    if type(fast).__name__ == type(proc).__name__:
        fast = None
except Exception:
    fast = None

names = ["photo.jpg", "wide.png", "alpha.png", "palette.png", "gray.webp", "gray16.png", "rgb16.png"]
pixels, pixels_u8, report = {}, {}, {"backend_max_abs_diff": {}}
for n in names:
    pv = proc(images=load_rgb(IMG / n), return_tensors="pt").pixel_values.float()
    u8 = (pv + 1) / 2 * 255
    assert (u8 - u8.round()).abs().max() < 1e-3, "PIL output should be whole 8-bit steps"
    pixels[n] = pv
    pixels_u8[n.replace(".", "_")] = u8.round().to(torch.uint8).contiguous()
    if fast is not None:
        pf = fast(images=load_rgb(IMG / n), return_tensors="pt").pixel_values.float()
        report["backend_max_abs_diff"][n] = float((pf - pv).abs().max())
save_file(pixels_u8, OUT / "pixels_u8.safetensors")

# ---------------------------------------------------------------- IP-Adapter (tiny, real layout)
ID, CROSS, TOKENS, HIDDEN, HEAD_DIM, NPROC = 32, 64, 8, 48, 16, 5

class MLPProjModel(torch.nn.Module):  # InstantX's projection
    def __init__(self, cross_attention_dim, id_embeddings_dim, num_tokens):
        super().__init__()
        self.cross_attention_dim, self.num_tokens = cross_attention_dim, num_tokens
        self.proj = torch.nn.Sequential(torch.nn.Linear(id_embeddings_dim, id_embeddings_dim * 2), torch.nn.GELU(),
                                        torch.nn.Linear(id_embeddings_dim * 2, cross_attention_dim * num_tokens))
        self.norm = torch.nn.LayerNorm(cross_attention_dim)
    def forward(self, x):
        return self.norm(self.proj(x).reshape(-1, self.num_tokens, self.cross_attention_dim))

class IPProc(torch.nn.Module):  # the weights of IPAFluxAttnProcessor2_0
    def __init__(self):
        super().__init__()
        self.to_k_ip = torch.nn.Linear(CROSS, HIDDEN, bias=False)
        self.to_v_ip = torch.nn.Linear(CROSS, HIDDEN, bias=False)

def rms(x, eps=1e-5):  # diffusers RMSNorm(elementwise_affine=False)
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)

proj = MLPProjModel(CROSS, ID, TOKENS)
procs = torch.nn.ModuleList([IPProc() for _ in range(NPROC)])
with torch.no_grad():
    for p in list(proj.parameters()) + list(procs.parameters()):
        p.copy_((torch.randn_like(p) * 0.3).bfloat16().float())  # bf16-exact: the real file is bf16
    proj.norm.weight.copy_((1 + torch.randn(CROSS) * 0.1).bfloat16().float())
sd = {"image_proj": {k: v.bfloat16() for k, v in proj.state_dict().items()},
      "ip_adapter": {k: v.bfloat16() for k, v in procs.state_dict().items()}}
torch.save(sd, OUT / "ip-adapter.bin")
flat = {f"{top}.{k}": v.contiguous() for top, d in sd.items() for k, v in d.items()}
save_file(flat, OUT / "ip-adapter.safetensors")
bad = dict(flat)
bad["ip_adapter.1.to_v_ip.weight"] = torch.zeros(HIDDEN, CROSS + 1, dtype=torch.bfloat16)
del bad["ip_adapter.3.to_k_ip.weight"]
bad["ip_adapter.0.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
save_file(bad, OUT / "ip-adapter-bad-shapes.safetensors")

class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ipaflux-pickle-executed",))
torch.save({"image_proj": {"norm.weight": torch.zeros(2)}, "payload": Evil()}, OUT / "evil.bin")

# ---------------------------------------------------------------- goldens
gold = {}
with torch.no_grad():
    for n in names:
        key = n.replace(".", "_")
        gold[f"pooled.{key}"] = vision(pixel_values=pixels[n]).pooler_output.float()
    vb = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    vb.load_state_dict(vision.state_dict())
    vb = vb.to(torch.bfloat16)
    gold["pooled_bf16.photo_jpg"] = vb(pixel_values=pixels["photo.jpg"].bfloat16()).pooler_output.float()
    pooled = gold["pooled.photo_jpg"]
    embeds = proj(pooled)
    gold["image_prompt_embeds.photo_jpg"] = embeds
    q = torch.randn(1, HIDDEN // HEAD_DIM, 10, HEAD_DIM)
    gold["query"] = q
    SCALE = 0.7
    for variant, vnorm in (("instantx", False), ("comfyui", True)):
        for i, p in enumerate(procs):
            k = p.to_k_ip(embeds).view(1, -1, HIDDEN // HEAD_DIM, HEAD_DIM).transpose(1, 2)
            v = p.to_v_ip(embeds).view(1, -1, HIDDEN // HEAD_DIM, HEAD_DIM).transpose(1, 2)
            k = rms(k)
            if vnorm:
                v = rms(v)
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            o = o.transpose(1, 2).reshape(1, -1, HIDDEN) * SCALE
            gold[f"{variant}.{i}.k"], gold[f"{variant}.{i}.v"], gold[f"{variant}.{i}.attn"] = k, v, o
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")

report.update({
    "torch": torch.__version__, "transformers": transformers.__version__, "pillow": Image.__version__,
    "ip_scale": SCALE, "ip_head_dim": HEAD_DIM, "images": names,
    "note": "gray16.png is scaled by 1/257 before the processor; Pillow's convert('RGB') would clip it at 255.",
})
(OUT / "reference.json").write_text(json.dumps(report, indent=2) + "\n")
print(json.dumps(report, indent=2))
