"""What the diffusers-pipeline fixture scripts share: FLUX.1-dev's scheduler
config, a Flux pipeline of any kind over the tiny models without text
encoders (the scripts pass embeddings), and the tiny models loaded in f32.
Imported by make_{img2img,cfg,redux,inpaint,fill,kontext}_fixtures.py.
"""
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel


def dev_scheduler():
    """FLUX.1-dev's scheduler_config.json (Fill-dev's and Kontext-dev's are the same)."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096)


def pipeline(cls, transformer, vae):
    """A `cls` pipeline (FluxPipeline, FluxImg2ImgPipeline, ...) with no text encoders."""
    return cls(scheduler=dev_scheduler(), vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
               tokenizer_2=None, transformer=transformer)


def transformer(path):
    return FluxTransformer2DModel.from_pretrained(path, torch_dtype=torch.float32).eval()


def vae(path):
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval()
