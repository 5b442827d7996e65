"""What the diffusers-pipeline fixture scripts share: FLUX.1-dev's scheduler
config, a Flux pipeline of any kind over the tiny models without text
encoders (the scripts pass embeddings), and the tiny models loaded in f32.
Imported by make_{img2img,cfg,redux,inpaint,fill,kontext,control,controlnet,multi_controlnet}_fixtures.py.
"""
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxTransformer2DModel


def dev_scheduler():
    """FLUX.1-dev's scheduler_config.json (Fill-dev's and Kontext-dev's are the same)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)


def pipeline(cls, transformer, vae):
    """A `cls` pipeline (FluxPipeline, FluxImg2ImgPipeline, ...) with no text encoders."""
    return cls(scheduler=dev_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
               tokenizer_2=None, transformer=transformer)


# The tiny Flux's sizes (make_flux_fixtures.py); Fill and Control change only the input channels.
TINY = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=3, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def random_transformer(in_channels):
    """A tiny Flux taking `in_channels` per token, from torch's current seed:
    QK-norm scales near 1, small biases, weights scaled by 1/sqrt(fan-in)."""
    model = FluxTransformer2DModel(**{**TINY, "in_channels": in_channels}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:  # QK-norm scales
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def capture_conditioning(transformer, gold):
    """Makes `transformer` record in `gold["cond"]` the input channels after the
    latents' 64 (FLUX.1 Fill's and Canny/Depth's conditioning) at each call."""
    forward = transformer.forward

    def capture(*args, hidden_states=None, **kwargs):
        gold["cond"] = hidden_states[..., 64:].clone()
        return forward(*args, hidden_states=hidden_states, **kwargs)

    transformer.forward = capture


def transformer(path):
    return FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()


def vae(path):
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()


def random_controlnet(path, **config):
    """A random ControlNet with the tiny Flux's sizes (nothing zeroed: its residuals must matter), saved in
    bf16 and read back in f32."""
    sizes = {k: v for k, v in TINY.items() if k != "out_channels"}
    model = FluxControlNetModel(**{**sizes, **config}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn_like(p))
            elif "mode_embedder" in name:
                p.copy_(torch.randn_like(p))
            elif p.ndim == 4:  # the hint block's convolutions
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model.to(torch.bfloat16).save_pretrained(path)
    return FluxControlNetModel.from_pretrained(path, torch_dtype=torch.float32).eval()
