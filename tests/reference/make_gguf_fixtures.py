#!/usr/bin/env python3
"""GGUF fixtures: every GGML type we read, the tiny Flux under the names of
city96's converter (ComfyUI-GGUF), and the tiny T5 encoder under llama.cpp's,
with goldens from gguf-py (llama.cpp's Python package) reading the files back.

Run after `pip install gguf numpy safetensors` (and make_flux_fixtures.py,
whose tiny BFL-layout Flux this converts):
    python3 tests/reference/make_gguf_fixtures.py

- `gguf/ggml-types.gguf`: one [3, 512] tensor per type, named after it: F32,
  F16, BF16 and the legacy types quantized from random normals by
  `gguf.quants.quantize`; the k-quants (which gguf-py cannot quantize) as
  random blocks whose f16 scales are set to small positive values.
- `gguf/ggml-types.safetensors`: the same tensors as `gguf.quants.dequantize`
  reads them from the file, in f32.
- `flux/flux-tiny-bfl.gguf`: `flux/flux-tiny-bfl.safetensors` with the names
  and metadata of city96's converter (`tools/convert.py`: BFL's names,
  `general.architecture` "flux"), vectors in F32, matrices whose rows are
  whole blocks quantized (Q8_0, Q5_1, Q4_0, Q5_0, Q4_1 in turn; the 256-wide
  embedders' first layers as random Q4_K/Q6_K blocks), the rest in F16. The
  converter keeps the embedders in F32; here they are quantized too, so more
  of the model goes through dequantization.
- `flux/flux-tiny-bfl-gguf.safetensors`: the quantized tensors of that file as
  gguf-py dequantizes them, in f32.
- `pipeline/t5-encoder.gguf`: the tiny T5 encoder (`pipeline/t5/`) under
  llama.cpp's T5 names (`enc.blk.N.attn_q`, `token_embd`, ...), architecture
  "t5encoder", as city96's T5 encoder GGUFs are: matrices in Q8_0, the rest F32.
- `pipeline/t5-encoder-gguf.safetensors`: every tensor of that file as gguf-py
  reads it, in f32, under the Hugging Face names.
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

# The tiny Flux under city96's converter's names and metadata (types: see the docstring).
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

# The tiny T5 encoder under llama.cpp's names (its `convert_hf_to_gguf.py` T5 mapping).
T5_PARTS = {
    "layer.0.SelfAttention.q": "attn_q", "layer.0.SelfAttention.k": "attn_k",
    "layer.0.SelfAttention.v": "attn_v", "layer.0.SelfAttention.o": "attn_o",
    "layer.0.SelfAttention.relative_attention_bias": "attn_rel_b", "layer.0.layer_norm": "attn_norm",
    "layer.1.DenseReluDense.wi_0": "ffn_gate", "layer.1.DenseReluDense.wi_1": "ffn_up",
    "layer.1.DenseReluDense.wo": "ffn_down", "layer.1.layer_norm": "ffn_norm",
}


def llama_cpp_t5_name(hf):
    if hf == "shared.weight":
        return "token_embd.weight"
    if hf == "encoder.final_layer_norm.weight":
        return "enc.output_norm.weight"
    _, _, block, rest = hf.split(".", 3)  # encoder.block.N.<part>.weight
    return f"enc.blk.{block}.{T5_PARTS[rest.removesuffix('.weight')]}.weight"


t5 = load_file(ROOT / "pipeline/t5/model.safetensors")
tensors = {llama_cpp_t5_name(k): encode(v, T.Q8_0 if v.ndim == 2 and v.shape[-1] % 32 == 0 else T.F32)
           for k, v in sorted(t5.items())}
write(ROOT / "pipeline/t5-encoder.gguf", "t5encoder", tensors)
back = read_back(ROOT / "pipeline/t5-encoder.gguf")
hf_of = {llama_cpp_t5_name(k): k for k in t5}
assert sorted(back) == sorted(hf_of)
save_file({hf_of[k]: v for k, (v, _) in back.items()}, ROOT / "pipeline/t5-encoder-gguf.safetensors")
print(f"T5 GGUF with {sum(q == T.Q8_0 for _, q in back.values())} Q8_0 of {len(back)} tensors")
