#!/usr/bin/env python3
"""Two tiny random Flux LoRAs (kohya/sd-scripts names and diffusers/PEFT
names) for the tiny Flux of make_flux_fixtures.py, and the transformer's output
with them applied by diffusers' own LoRA loading (PEFT layers, unmerged).

Run after make_flux_fixtures.py, with `pip install torch diffusers peft safetensors`:
    python3 tests/reference/make_lora_fixtures.py

- `flux/lora-kohya.safetensors`: `lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`, ...
  over BFL's fused layers (Q/K/V, the single blocks' linear1), with `alpha`
  (not on the final layer: diffusers' converter ignores alphas there), plus four
  CLIP-L (`lora_te1_*`) and four T5 (`lora_te3_*`) modules for the tiny text
  encoders of make_pipeline_fixtures.py. diffusers
  converts it to PEFT names itself, except the single blocks' `linear1`, which
  its converter cuts at FLUX.1's sizes; `split_linear1` does that one.
- `flux/lora-peft.safetensors`: `transformer.transformer_blocks.0.attn.to_q.lora_A.weight`, ...
  on some of the separate Q/K/V projections only, ranks differing per module, no alpha.
- `flux/lora-golden.safetensors`: outputs for the inputs of `flux/golden.safetensors`:
  kohya at strength 0.8, PEFT at 1.0, both together (0.8 and 1.0); and the tiny CLIP's
  pooled output and T5's last hidden state for the pipeline golden's two prompts with the
  kohya file's text-encoder parts merged at strength 0.5 (`text.*`).
"""
import json
from pathlib import Path

import diffusers
import peft
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, T5EncoderModel

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"
torch.manual_seed(7)
H, MLP, CTX, VEC, IN, T = 48, 192, 64, 32, 64, 256
DOUBLE, SINGLE = 2, 3


def pair(sd, key, names, rank, inp, out, alpha=None):
    """A LoRA module whose change is about a third of a weight's size."""
    down = torch.randn(rank, inp) / inp ** 0.5
    up = torch.randn(out, rank) * 0.3 / rank ** 0.5
    sd[f"{key}.{names[0]}"], sd[f"{key}.{names[1]}"] = down, up
    if alpha is not None:
        sd[f"{key}.alpha"] = torch.tensor(float(alpha))


KOHYA = ("lora_down.weight", "lora_up.weight")
kohya = {}
for i in range(DOUBLE):
    p = f"lora_unet_double_blocks_{i}_"
    pair(kohya, p + "img_attn_qkv", KOHYA, 4, H, 3 * H, alpha=2)
    pair(kohya, p + "img_attn_proj", KOHYA, 4, H, H, alpha=8)
    pair(kohya, p + "txt_attn_qkv", KOHYA, 3, H, 3 * H)
    pair(kohya, p + "img_mlp_0", KOHYA, 2, H, MLP, alpha=1)
    pair(kohya, p + "txt_mlp_2", KOHYA, 4, MLP, H, alpha=4)
    pair(kohya, p + "img_mod_lin", KOHYA, 2, H, 6 * H, alpha=3)
    pair(kohya, p + "txt_mod_lin", KOHYA, 2, H, 6 * H)
for i in range(SINGLE):
    p = f"lora_unet_single_blocks_{i}_"
    pair(kohya, p + "linear1", KOHYA, 4, H, 3 * H + MLP, alpha=3)
    pair(kohya, p + "linear2", KOHYA, 2, H + MLP, H, alpha=1)
    pair(kohya, p + "modulation_lin", KOHYA, 2, H, 3 * H)
pair(kohya, "lora_unet_img_in", KOHYA, 2, IN, H, alpha=1)
pair(kohya, "lora_unet_txt_in", KOHYA, 2, CTX, H, alpha=4)
pair(kohya, "lora_unet_time_in_in_layer", KOHYA, 2, T, H, alpha=2)
pair(kohya, "lora_unet_vector_in_out_layer", KOHYA, 2, H, H, alpha=2)
pair(kohya, "lora_unet_guidance_in_in_layer", KOHYA, 2, T, H, alpha=2)
pair(kohya, "lora_unet_final_layer_linear", KOHYA, 2, H, IN)
pair(kohya, "lora_unet_final_layer_adaLN_modulation_1", KOHYA, 2, H, 2 * H)
# The text encoders' parts, for the tiny CLIP (hidden 32, MLP 64) and T5 (d_model 64, d_ff 128) of
# make_pipeline_fixtures.py: sd-scripts names CLIP-L `lora_te1_` and T5-XXL `lora_te3_` for Flux.
for j in range(2):
    pair(kohya, f"lora_te1_text_model_encoder_layers_{j}_mlp_fc1", KOHYA, 2, 32, 64, alpha=1)
    pair(kohya, f"lora_te1_text_model_encoder_layers_{j}_self_attn_q_proj", KOHYA, 2, 32, 32, alpha=4)
    pair(kohya, f"lora_te3_encoder_block_{j}_layer_0_SelfAttention_q", KOHYA, 2, 64, 64, alpha=1)
    pair(kohya, f"lora_te3_encoder_block_{j}_layer_1_DenseReluDense_wi_0", KOHYA, 4, 64, 128)

PEFT = ("lora_A.weight", "lora_B.weight")
peft_sd = {}
for i in range(DOUBLE):
    p = f"transformer.transformer_blocks.{i}."
    pair(peft_sd, p + "attn.to_q", PEFT, 4, H, H)
    pair(peft_sd, p + "attn.to_k", PEFT, 4, H, H)
    pair(peft_sd, p + "attn.add_v_proj", PEFT, 2, H, H)
    pair(peft_sd, p + "attn.to_out.0", PEFT, 4, H, H)
    pair(peft_sd, p + "ff.net.0.proj", PEFT, 2, H, MLP)
    pair(peft_sd, p + "norm1_context.linear", PEFT, 2, H, 6 * H)
for i in range(SINGLE):
    p = f"transformer.single_transformer_blocks.{i}."
    pair(peft_sd, p + "attn.to_k", PEFT, 4, H, H)
    pair(peft_sd, p + "proj_mlp", PEFT, 2, H, MLP)
    pair(peft_sd, p + "proj_out", PEFT, 4, H + MLP, H)
    pair(peft_sd, p + "norm.linear", PEFT, 2, H, 3 * H)
pair(peft_sd, "transformer.norm_out.linear", PEFT, 2, H, 2 * H)
pair(peft_sd, "transformer.x_embedder", PEFT, 2, IN, H)
pair(peft_sd, "transformer.time_text_embed.guidance_embedder.linear_2", PEFT, 2, H, H)

save_file({k: v.contiguous() for k, v in kohya.items()}, OUT / "lora-kohya.safetensors")
save_file({k: v.contiguous() for k, v in peft_sd.items()}, OUT / "lora-peft.safetensors")

model = FluxTransformer2DModel.from_pretrained(OUT / "transformer", torch_dtype=torch.float32).eval()
g = load_file(OUT / "golden.safetensors")
ROWS, COLS, TXT, SIGMA, GUIDANCE = 4, 6, 7, 0.75, 3.5
img_ids = torch.zeros(ROWS, COLS, 3)
img_ids[..., 1] = torch.arange(ROWS)[:, None]
img_ids[..., 2] = torch.arange(COLS)[None, :]
img_ids = img_ids.reshape(-1, 3)
txt_ids = torch.zeros(TXT, 3)


def run():
    with torch.no_grad():
        return model(hidden_states=g["in.img"], encoder_hidden_states=g["in.txt"], pooled_projections=g["in.y"],
                     timestep=torch.tensor([SIGMA]), img_ids=img_ids, txt_ids=txt_ids,
                     guidance=torch.tensor([GUIDANCE]), return_dict=False)[0]


plain = run()
print("plain vs golden", ((plain - g["out.plain"]).abs().max() / g["out.plain"].abs().max()).item())
assert torch.allclose(plain, g["out.plain"], rtol=0, atol=1e-4 * g["out.plain"].abs().max().item()), "the tiny Flux is not the one golden.safetensors was made with"


def split_linear1(sd):
    """diffusers' kohya converter splits `single_blocks_N_linear1` by FLUX.1's sizes
    (3 × 3072 + 12288 rows), not the tiny model's; split those here the same way
    (down scaled by alpha / rank and shared, up cut into Q, K, V and MLP rows)."""
    out = {}
    for k in [k for k in sd if "_linear1." in k and k.endswith(".lora_down.weight")]:
        m = k.removesuffix(".lora_down.weight")
        i = m.split("_")[-2]
        down, up = sd.pop(m + ".lora_down.weight"), sd.pop(m + ".lora_up.weight")
        alpha = sd.pop(m + ".alpha", torch.tensor(float(down.shape[0]))).item()
        p = f"transformer.single_transformer_blocks.{i}."
        for name, u in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], up.split([H, H, H, MLP], 0)):
            out[p + name + ".lora_A.weight"] = down * (alpha / down.shape[0])
            out[p + name + ".lora_B.weight"] = u
    return out


def load(path, name):
    # diffusers takes the transformer's modules here; the text encoders' are checked below.
    sd = {k: v for k, v in load_file(path).items() if not k.startswith("lora_te")}
    linear1 = split_linear1(sd)
    sd = FluxPipeline.lora_state_dict(sd)
    sd.update(linear1)
    # The transformer's part only (the kohya file's CLIP modules go to a text encoder we do not run).
    # The converter leaves the modules outside the blocks (x_embedder, proj_out, ...) without the
    # `transformer.` prefix, so diffusers' pipeline would drop them; sd-scripts and ComfyUI apply
    # them, so they are prefixed here and the golden has every module.
    sd = {(k if k.startswith("transformer.") else "transformer." + k): v
          for k, v in sd.items() if not k.startswith("text_encoder")}
    model.load_lora_adapter(sd, adapter_name=name, prefix="transformer")
    return sd


kohya_conv = load(OUT / "lora-kohya.safetensors", "kohya")
peft_conv = load(OUT / "lora-peft.safetensors", "peft")
# Every module of both files became a PEFT layer of the model (none dropped by the conversions).
wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and "kohya" in m.lora_A}
modules = {k.rsplit(".lora_", 1)[0] for k in kohya_conv}
assert len(wrapped) == len(modules) == 2 * 11 + 3 * 6 + 7, (len(wrapped), len(modules))

gold = {}
model.set_adapters(["kohya"], [0.8])
gold["out.kohya_0.8"] = run()
model.set_adapters(["peft"], [1.0])
gold["out.peft"] = run()
model.set_adapters(["kohya", "peft"], [0.8, 1.0])
gold["out.both"] = run()
for k, v in gold.items():
    rel = ((v - plain).abs().max() / plain.abs().max()).item()
    assert rel > 1e-2, f"{k}: the LoRA barely changes the output ({rel})"

# The kohya file's text-encoder parts at strength 0.5, merged into the tiny CLIP and T5 as sd-scripts and
# ComfyUI apply them (W += strength * alpha / rank * up @ down), run on the pipeline golden's token ids.
TEXT_STRENGTH = 0.5
P = OUT.parent / "pipeline"
pipe_gold = load_file(P / "golden.safetensors")


def merged(model, prefix):
    sd = model.state_dict()
    by_kohya = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            stem = k.removesuffix(".weight")
            by_kohya[prefix + ("text_model_" if prefix == "lora_te1_" else "") +
                     stem.removeprefix("text_model.").replace(".", "_")] = k
    n = 0
    for key in [k for k in kohya if k.startswith(prefix) and k.endswith(".lora_down.weight")]:
        m = key.removesuffix(".lora_down.weight")
        down, up = kohya[key], kohya[m + ".lora_up.weight"]
        alpha = kohya.get(m + ".alpha", torch.tensor(float(down.shape[0]))).item()
        sd[by_kohya[m]] = sd[by_kohya[m]] + TEXT_STRENGTH * alpha / down.shape[0] * (up @ down)
        n += 1
    model.load_state_dict(sd)
    return n


clip = CLIPTextModel.from_pretrained(P / "clip").eval()
t5 = T5EncoderModel.from_pretrained(P / "t5").eval()
plain_text = {}
with torch.no_grad():
    for i in range(2):
        plain_text[f"text.clip.pooled.{i}"] = clip(input_ids=pipe_gold[f"clip.ids.{i}"]).pooler_output
        plain_text[f"text.t5.out.{i}"] = t5(input_ids=pipe_gold[f"t5.ids.{i}"]).last_hidden_state
    assert merged(clip, "lora_te1_") == 4 and merged(t5, "lora_te3_") == 4
    for i in range(2):
        gold[f"text.clip.pooled.{i}"] = clip(input_ids=pipe_gold[f"clip.ids.{i}"]).pooler_output
        gold[f"text.t5.out.{i}"] = t5(input_ids=pipe_gold[f"t5.ids.{i}"]).last_hidden_state
for k, v in plain_text.items():
    assert torch.allclose(v, pipe_gold[k.removeprefix("text.")], atol=1e-5), f"{k}: not the pipeline's encoder"
    rel = ((gold[k] - v).abs().max() / v.abs().max()).item()
    assert rel > 1e-2, f"{k}: the LoRA barely changes the output ({rel})"
save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "lora-golden.safetensors")
(OUT / "lora-reference.json").write_text(json.dumps({
    "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
    "kohya_strength": 0.8, "peft_strength": 1.0, "text_strength": TEXT_STRENGTH,
}, indent=2) + "\n")
print("wrote lora-kohya.safetensors, lora-peft.safetensors, lora-golden.safetensors")
