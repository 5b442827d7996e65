#!/usr/bin/env python3
"""GGUF fixtures: every GGML type we read, and the tiny Flux as a GGUF file
laid out as city96's converter (ComfyUI-GGUF) writes Flux, with goldens from
gguf-py (llama.cpp's Python package) reading the files back.

Run after `pip install gguf numpy safetensors` (and make_flux_fixtures.py,
whose tiny BFL-layout Flux this converts):
    python3 tests/reference/make_gguf_fixtures.py

- `gguf/ggml-types.gguf`: one [3, 512] tensor per type, named after it: F32,
  F16, BF16 and the legacy types quantized from random normals by
  `gguf.quants.quantize`; the k-quants (which gguf-py cannot quantize) as
  random blocks whose f16 scales are set to small positive values.
- `gguf/ggml-types.safetensors`: the same tensors as `gguf.quants.dequantize`
  reads them from the file, in f32.
- `flux/flux-tiny-bfl.gguf`: `flux/flux-tiny-bfl.safetensors` with BFL's names,
  `general.architecture` "flux", vectors in F32, matrices whose rows are whole
  blocks quantized (Q8_0, Q5_1, Q4_0, Q5_0, Q4_1 in turn; the 256-wide
  embedders' first layers as random Q4_K/Q6_K blocks), the rest in F16, as
  city96's converter falls back for rows that are not whole blocks.
- `flux/flux-tiny-bfl-gguf.safetensors`: the quantized tensors of that file as
  gguf-py dequantizes them, in f32.
"""
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from safetensors.numpy import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
(ROOT / "gguf").mkdir(exist_ok=True)
rng = np.random.default_rng(7)

LEGACY = [T.Q8_0, T.Q5_1, T.Q4_0, T.Q5_0, T.Q4_1]
# Byte offsets of each k-quant block's f16 scale fields (ggml's block structs).
K_SCALES = {T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}


def random_k_blocks(qtype, rows, cols):
    """Random k-quant blocks (any bits are valid) with finite, small f16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype]:
        scales = rng.uniform(1e-3, 2e-2, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode(x, qtype):
    """(array to store, its GGML type): quantized bytes, or the floats themselves."""
    if qtype == T.F32:
        return x.astype(np.float32), None
    if qtype == T.F16:
        return x.astype(np.float16), None
    if qtype in K_SCALES:
        return random_k_blocks(qtype, *x.shape), qtype
    return gguf.quants.quantize(x.astype(np.float32), qtype), qtype


def write(path, arch, tensors):
    w = gguf.GGUFWriter(path, arch)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_back(path):
    """Every tensor of a GGUF file as gguf-py dequantizes it (f32), and its type."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        out[t.name] = (np.ascontiguousarray(values.reshape(shape)), t.tensor_type)
    return out


# Every type, one tensor each.
types = [T.F32, T.F16, T.BF16, *LEGACY, *K_SCALES]
tensors = {q.name: encode(rng.standard_normal((3, 512)), q) for q in types}
write(ROOT / "gguf/ggml-types.gguf", "ipaflux-test", tensors)
back = read_back(ROOT / "gguf/ggml-types.gguf")
assert sorted(back) == sorted(q.name for q in types)
assert all(back[q.name][1] == q for q in types)
save_file({k: v for k, (v, _) in back.items()}, ROOT / "gguf/ggml-types.safetensors")

# The tiny Flux, as city96's converter lays out Flux.
sd = load_file(ROOT / "flux/flux-tiny-bfl.safetensors")
tensors, turn = {}, 0
for name in sorted(sd):
    x = sd[name]
    if x.ndim == 1:
        tensors[name] = encode(x, T.F32)
    elif name in ("time_in.in_layer.weight", "guidance_in.in_layer.weight"):
        tensors[name] = encode(x, T.Q4_K if name.startswith("time") else T.Q6_K)
    elif x.shape[-1] % 32 == 0:
        tensors[name] = encode(x, LEGACY[turn % len(LEGACY)])
        turn += 1
    else:
        tensors[name] = encode(x, T.F16)
write(ROOT / "flux/flux-tiny-bfl.gguf", "flux", tensors)
back = read_back(ROOT / "flux/flux-tiny-bfl.gguf")
assert sorted(back) == sorted(sd)
quantized = {k: v for k, (v, q) in back.items() if q not in (T.F32, T.F16)}
assert len(quantized) == turn + 2
save_file(quantized, ROOT / "flux/flux-tiny-bfl-gguf.safetensors")
print(f"wrote {len(types)} type fixtures; Flux GGUF with {len(quantized)} quantized of {len(back)} tensors")
