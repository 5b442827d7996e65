#!/usr/bin/env python3
"""Tiny random text encoders and VAE decoder for the end-to-end pipeline, with goldens.

Run after `pip install torch transformers diffusers tokenizers safetensors`:
    python3 tests/reference/make_pipeline_fixtures.py

Sizes fit the tiny Flux of make_flux_fixtures.py (T5 width 64 = its context width,
CLIP width 32 = its pooled-vector width, 16 latent channels).
- `pipeline/t5/`: `T5EncoderModel.save_pretrained` (gated-GELU like T5 v1.1-XXL) + a
  Unigram `tokenizer.json` (Metaspace, `</s>` appended) trained here on a few sentences.
- `pipeline/clip/`: `CLIPTextModel.save_pretrained` (quick-GELU like CLIP-L) + a
  byte-level BPE `tokenizer.json` with `</w>` suffixes, wrapped in start/end tokens.
- `pipeline/ae.safetensors`: BFL `ae.safetensors` layout (decoder only, f16). Its
  golden comes from diffusers' `AutoencoderKL` after diffusers' own LDM→diffusers
  converter (`convert_ldm_vae_checkpoint`), which also proves the key layout.
- `pipeline/golden.safetensors`: token ids, T5 last hidden state, CLIP pooled output
  (first end token, as transformers does when `eos_token_id != 2`), VAE decode.
"""
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

OUT = Path(__file__).resolve().parent.parent / "fixtures" / "pipeline"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(2)
MAX_T5, MAX_CLIP = 16, 16
CORPUS = [
    "a photo of a cat sitting on a red sofa", "a watercolor painting of mountains at sunset",
    "portrait of a woman in the style of the reference image", "a dog running on the beach",
    "studio photo, soft light, high detail", "an astronaut riding a horse on the moon",
    "the quick brown fox jumps over the lazy dog", "a bowl of fruit on a wooden table",
] * 4
PROMPTS = ["a cat on a sofa, watercolor", "portrait of an astronaut with a very long prompt that gets truncated here"]


def randomize(model, std=0.2):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name and p.ndim == 1 and "bias" not in name
                    else torch.randn_like(p) * std)


# ---------------------------------------------------------------- T5 (encoder only)
t5_tok = Tokenizer(models.Unigram())
t5_tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
t5_tok.pre_tokenizer = pre_tokenizers.Metaspace()
t5_tok.decoder = decoders.Metaspace()
t5_tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=96, special_tokens=["<pad>", "</s>", "<unk>"],
                                                             unk_token="<unk>"))
t5_tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
(OUT / "t5").mkdir(exist_ok=True)
t5_tok.save(str(OUT / "t5" / "tokenizer.json"))
t5 = T5EncoderModel(T5Config(vocab_size=t5_tok.get_vocab_size(), d_model=64, d_kv=16, d_ff=128, num_layers=2,
                             num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                             feed_forward_proj="gated-gelu", is_encoder_decoder=False, pad_token_id=0,
                             eos_token_id=1, decoder_start_token_id=0)).eval()
randomize(t5)
t5.save_pretrained(OUT / "t5")

# ---------------------------------------------------------------- CLIP text
clip_tok = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
clip_tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                            normalizers.Lowercase()])
clip_tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed",
                         invert=True),
    pre_tokenizers.ByteLevel(add_prefix_space=False)])
clip_tok.decoder = decoders.BPEDecoder(suffix="</w>")
clip_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
    vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
clip_tok.post_processor = processors.TemplateProcessing(
    single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
(OUT / "clip").mkdir(exist_ok=True)
clip_tok.save(str(OUT / "clip" / "tokenizer.json"))
clip = CLIPTextModel(CLIPTextConfig(vocab_size=clip_tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_CLIP,
                                    hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                    projection_dim=32)).eval()
randomize(clip)
clip.save_pretrained(OUT / "clip")


def ids(path, prompt, max_len, pad):
    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    tok.pad_token = pad
    return tok(prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").input_ids


gold = {}
with torch.no_grad():
    for i, p in enumerate(PROMPTS):
        t = ids(OUT / "t5" / "tokenizer.json", p, MAX_T5, "<pad>")
        c = ids(OUT / "clip" / "tokenizer.json", p, MAX_CLIP, "<|endoftext|>")
        gold[f"t5.ids.{i}"] = t.to(torch.int64)
        gold[f"clip.ids.{i}"] = c.to(torch.int64)
        gold[f"t5.out.{i}"] = t5(input_ids=t).last_hidden_state
        gold[f"clip.pooled.{i}"] = clip(input_ids=c).pooler_output

# ---------------------------------------------------------------- VAE decoder, BFL ae.safetensors layout
CH, CH_MULT, NRB, Z = 32, [1, 1, 1, 2], 0, 16
SCALE, SHIFT = 0.3611, 0.1159
ae = {}


def conv(name, cin, cout, k=3):
    ae[name + ".weight"] = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    ae[name + ".bias"] = 0.05 * torch.randn(cout)


def norm(name, c):
    ae[name + ".weight"] = 1 + 0.1 * torch.randn(c)
    ae[name + ".bias"] = 0.05 * torch.randn(c)


def resnet(name, cin, cout):
    norm(name + ".norm1", cin)
    conv(name + ".conv1", cin, cout)
    norm(name + ".norm2", cout)
    conv(name + ".conv2", cout, cout)
    if cin != cout:
        conv(name + ".nin_shortcut", cin, cout, 1)


block_in = CH * CH_MULT[-1]
conv("decoder.conv_in", Z, block_in)
resnet("decoder.mid.block_1", block_in, block_in)
norm("decoder.mid.attn_1.norm", block_in)
for n in "qkv":
    conv(f"decoder.mid.attn_1.{n}", block_in, block_in, 1)
conv("decoder.mid.attn_1.proj_out", block_in, block_in, 1)
resnet("decoder.mid.block_2", block_in, block_in)
for level in reversed(range(len(CH_MULT))):
    block_out = CH * CH_MULT[level]
    for b in range(NRB + 1):
        resnet(f"decoder.up.{level}.block.{b}", block_in, block_out)
        block_in = block_out
    if level != 0:
        conv(f"decoder.up.{level}.upsample.conv", block_in, block_in)
norm("decoder.norm_out", block_in)
conv("decoder.conv_out", block_in, 3)
ae = {k: v.half() for k, v in ae.items()}
save_file(ae, OUT / "ae.safetensors")

vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=Z, block_out_channels=[CH * m for m in CH_MULT],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=NRB, norm_num_groups=32, scaling_factor=SCALE, shift_factor=SHIFT,
               use_quant_conv=False, use_post_quant_conv=False)
vae = AutoencoderKL(**vae_cfg).eval()
converted = convert_ldm_vae_checkpoint({k: v.float() for k, v in ae.items()}, vae_cfg)
decoder_keys = {k for k in vae.state_dict() if k.startswith("decoder.")}
assert set(converted) == decoder_keys, (sorted(set(converted) ^ decoder_keys))[:10]
vae.load_state_dict(converted, strict=False)
latents = torch.randn(1, Z, 4, 6)
with torch.no_grad():
    gold["vae.latents"] = latents
    gold["vae.decoded"] = vae.decode(latents / SCALE + SHIFT).sample

save_file({k: v.contiguous() for k, v in gold.items()}, OUT / "golden.safetensors")
(OUT / "reference.json").write_text(json.dumps({
    "torch": torch.__version__, "transformers": transformers.__version__, "diffusers": diffusers.__version__,
    "prompts": PROMPTS, "max_t5": MAX_T5, "max_clip": MAX_CLIP,
    "vae": {"ch": CH, "ch_mult": CH_MULT, "num_res_blocks": NRB, "z_channels": Z, "scale_factor": SCALE,
            "shift_factor": SHIFT},
}, indent=2) + "\n")
print("wrote", sorted(p.name for p in OUT.iterdir()))
