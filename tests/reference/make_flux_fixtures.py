#!/usr/bin/env python3
"""Tiny random Flux transformer in both checkpoint layouts, with golden outputs
of one forward pass with and without the IP-Adapter, from diffusers.

Run after `pip install torch diffusers safetensors` (and make_fixtures.py, whose
tiny IP-Adapter this reuses: hidden 48 = 3 heads of 16, 5 processors, 8 tokens of 64):
    python3 tests/reference/make_flux_fixtures.py

- `flux/transformer/`: diffusers `FluxTransformer2DModel.save_pretrained`, sharded.
- `flux/flux-tiny-bfl.safetensors`: the same weights in BFL's single-file names
  (the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`).
- `flux/flux-tiny-bfl-fp8.safetensors`: BFL layout with every matrix stored as
  float8_e4m3fn; its golden uses those fp8 values upcast to f32.
- `flux/golden.safetensors`: inputs and outputs. The IP-Adapter enters through an
  attention processor that does InstantX's `IPAFluxAttnProcessor2_0` math on top of
  diffusers' `FluxAttnProcessor`: `ip_query` is the block's QK-normed query before
  RoPE (image tokens in double blocks, all tokens in single blocks), K RMS-normed
  per head (eps 1e-5), V too in the ComfyUI variant, `out += scale * sdpa(...)`
  before the output projection (double) / before `proj_out` (single).
"""
import json
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers import transformer_flux as tf
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
OUT = ROOT / "flux"
OUT.mkdir(exist_ok=True)
torch.manual_seed(1)

CFG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
           num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
           axes_dims_rope=(4, 6, 6))
model = FluxTransformer2DModel(**CFG).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if "norm" in name and p.ndim == 1:  # QK-norm scales
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif p.ndim == 1:
            p.copy_(0.05 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
model.save_pretrained(OUT / "transformer", max_shard_size="400KB")

H, MLP = 48, 192


def to_bfl(sd):
    out = {}

    def lin(dst, src):
        out[dst + ".weight"], out[dst + ".bias"] = sd[src + ".weight"], sd[src + ".bias"]

    def cat(dst, srcs):
        for wb in ("weight", "bias"):
            out[f"{dst}.{wb}"] = torch.cat([sd[f"{s}.{wb}"] for s in srcs], 0)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for dst, src in [("time_in", "timestep_embedder"), ("vector_in", "text_embedder"), ("guidance_in", "guidance_embedder")]:
        lin(dst + ".in_layer", f"time_text_embed.{src}.linear_1")
        lin(dst + ".out_layer", f"time_text_embed.{src}.linear_2")
    for i in range(CFG["num_layers"]):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        lin(q + "img_mod.lin", p + "norm1.linear")
        lin(q + "txt_mod.lin", p + "norm1_context.linear")
        cat(q + "img_attn.qkv", [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v"])
        cat(q + "txt_attn.qkv", [p + "attn.add_q_proj", p + "attn.add_k_proj", p + "attn.add_v_proj"])
        out[q + "img_attn.norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "img_attn.norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
        out[q + "txt_attn.norm.query_norm.scale"] = sd[p + "attn.norm_added_q.weight"]
        out[q + "txt_attn.norm.key_norm.scale"] = sd[p + "attn.norm_added_k.weight"]
        lin(q + "img_attn.proj", p + "attn.to_out.0")
        lin(q + "txt_attn.proj", p + "attn.to_add_out")
        lin(q + "img_mlp.0", p + "ff.net.0.proj")
        lin(q + "img_mlp.2", p + "ff.net.2")
        lin(q + "txt_mlp.0", p + "ff_context.net.0.proj")
        lin(q + "txt_mlp.2", p + "ff_context.net.2")
    for i in range(CFG["num_single_layers"]):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        cat(q + "linear1", [p + "attn.to_q", p + "attn.to_k", p + "attn.to_v", p + "proj_mlp"])
        lin(q + "linear2", p + "proj_out")
        lin(q + "modulation.lin", p + "norm.linear")
        out[q + "norm.query_norm.scale"] = sd[p + "attn.norm_q.weight"]
        out[q + "norm.key_norm.scale"] = sd[p + "attn.norm_k.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2, 0)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], 0)
    scale, shift = sd["norm_out.linear.bias"].chunk(2, 0)
    out["final_layer.adaLN_modulation.1.bias"] = torch.cat([shift, scale], 0)
    lin("final_layer.linear", "proj_out")
    # Every diffusers tensor used exactly once (BFL fuses Q/K/V, so count elements, not names).
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return {k: v.contiguous() for k, v in out.items()}


sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
bfl = to_bfl(sd)
save_file(bfl, OUT / "flux-tiny-bfl.safetensors")
fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in bfl.items()}
save_file(fp8, OUT / "flux-tiny-bfl-fp8.safetensors")
model_fp8 = FluxTransformer2DModel(**CFG).eval()
model_fp8.load_state_dict({k: (v.to(torch.float8_e4m3fn).float() if v.ndim == 2 else v) for k, v in sd.items()})

# ---------------------------------------------------------------- IP-Adapter processors
ip = {k: v.float() for k, v in load_file(ROOT / "ip-adapter.safetensors").items()}
NPROC = CFG["num_layers"] + CFG["num_single_layers"]


class InstantXProcessor:
    """diffusers' FluxAttnProcessor plus InstantX's IP branch."""

    def __init__(self, index, embeds, scale, v_norm):
        self.k_w = ip[f"ip_adapter.{index}.to_k_ip.weight"]
        self.v_w = ip[f"ip_adapter.{index}.to_v_ip.weight"]
        self.embeds, self.scale, self.v_norm = embeds, scale, v_norm
        self.norm = RMSNorm(16, eps=1e-5, elementwise_affine=False)

    def ip_term(self, attn, ip_query):  # ip_query [B, H, L, D]
        b = ip_query.shape[0]
        k = (self.embeds @ self.k_w.T).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
        v = (self.embeds @ self.v_w.T).view(b, -1, attn.heads, attn.head_dim).transpose(1, 2)
        k = self.norm(k)
        if self.v_norm:
            v = self.norm(v)
        o = F.scaled_dot_product_attention(ip_query, k, v)
        return o.transpose(1, 2).reshape(b, -1, attn.heads * attn.head_dim).to(ip_query.dtype)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value, eq, ek, ev = tf._get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        ip_query = query.transpose(1, 2)  # QK-normed, before RoPE
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query, key, value = torch.cat([eq, query], 1), torch.cat([ek, key], 1), torch.cat([ev, value], 1)
        query = tf.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = tf.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = tf.dispatch_attention_fn(query, key, value).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            enc, img = out.split_with_sizes([encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], 1)
            img = img + self.scale * self.ip_term(attn, ip_query)
            return attn.to_out[1](attn.to_out[0](img.contiguous())), attn.to_add_out(enc.contiguous())
        return out + self.scale * self.ip_term(attn, ip_query)


def set_ip(m, embeds, scales, v_norm):
    blocks = list(m.transformer_blocks) + list(m.single_transformer_blocks)
    for i, blk in enumerate(blocks):
        blk.attn.set_processor(InstantXProcessor(i, embeds, scales[i], v_norm) if scales is not None else tf.FluxAttnProcessor())


# ---------------------------------------------------------------- inputs and goldens
ROWS, COLS, TXT = 4, 6, 7
img = torch.randn(1, ROWS * COLS, 64)
txt = torch.randn(1, TXT, 64)
y = torch.randn(1, 32)
img_ids = torch.zeros(ROWS, COLS, 3)
img_ids[..., 1] = torch.arange(ROWS)[:, None]
img_ids[..., 2] = torch.arange(COLS)[None, :]
img_ids = img_ids.reshape(-1, 3)
txt_ids = torch.zeros(TXT, 3)
SIGMA, GUIDANCE, SCALE = 0.75, 3.5, 0.7  # sigma exact in bf16: both references round t to the model dtype
embeds_a = torch.randn(1, 8, 64)
embeds_b = torch.randn(1, 8, 64)
block_w = [1.0, 0.0, 0.5, 2.0, 0.0]


def run(m, embeds=None, scales=None, v_norm=False):
    set_ip(m, embeds, scales, v_norm)
    with torch.no_grad():
        return m(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=torch.tensor([SIGMA]),
                 img_ids=img_ids, txt_ids=txt_ids, guidance=torch.tensor([GUIDANCE]), return_dict=False)[0]


gold = {
    "in.img": img, "in.txt": txt, "in.y": y, "in.embeds_a": embeds_a, "in.embeds_b": embeds_b,
    "out.plain": run(model),
    "out.ip_instantx": run(model, embeds_a, [SCALE] * NPROC),
    "out.ip_comfyui": run(model, embeds_a, [SCALE] * NPROC, v_norm=True),
    "out.ip_blocks": run(model, embeds_a, [SCALE * w for w in block_w]),
    "out.fp8_ip_instantx": run(model_fp8, embeds_a, [SCALE] * NPROC),
}
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "config": CFG, "sigma": SIGMA,
    "guidance": GUIDANCE, "ip_scale": SCALE, "block_weights": block_w, "rows": ROWS, "cols": COLS, "txt_len": TXT,
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
