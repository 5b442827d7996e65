//! FLUX.1 transformer with typed attention hooks, the IP-Adapter as one such
//! hook, and flow-matching sampling.
//!
//! - [`config`]: sizes (dev/schnell presets, inferred from checkpoints);
//! - [`layout`]: BFL and diffusers checkpoint layouts → one canonical naming;
//! - [`lora`]: LoRA files (kohya, BFL and diffusers namings) mapped onto the canonical weights
//!   (FLUX.1 Canny/Depth LoRAs too: a wider input layer, replaced QK-norm scales);
//! - [`model`]: the transformer (double and single blocks, RoPE, modulation);
//! - [`hooks`]: where adapters enter a block, and with what;
//! - [`ip`]: the InstantX IP-Adapter hook (weights, sigma window, ramp, per-block weights, several images);
//! - [`xlabs`]: XLabs' IP-Adapter (CLIP image embeddings, double blocks, its term after the MLP);
//! - [`kontext`]: FLUX.1 Kontext's reference image tokens (positions, preferred resolutions);
//! - [`redux`]: FLUX.1 Redux, an image prompt as extra text tokens from SigLIP's token sequence;
//! - [`sampler`]: seeded noise, packing, Euler (true CFG, image-to-image; Fill and Canny/Depth
//!   channels, [`sampler::FluxVariant`]);
//! - [`stream`]: running with some blocks not resident (fetched per use from a [`stream::BlockSource`]).
//!
//! Not here: text encoders, the VAE, file IO, device placement (the caller,
//! with the memory registry, decides where weights live).

pub mod config;
pub mod controlnet;
pub mod hooks;
pub mod ip;
pub mod kontext;
pub mod layout;
pub mod lora;
#[cfg(test)]
mod mirror;
pub mod model;
pub mod redux;
pub mod sampler;
pub mod stream;
#[cfg(test)]
mod testing;
pub mod xlabs;

pub use config::FluxConfig;
pub use controlnet::{ControlInput, ControlNetDims, ControlResiduals, ControlWindow, FluxControlNet};
pub use hooks::{AttentionHook, Contribution, HookPoint, HookTerm, Hooks, Site};
pub use ip::{IpAdapterHook, IpHookConfig, IpImage, IpWeight};
pub use layout::FluxLayout;
pub use lora::{FluxLora, LoraSummary, TextEncoder};
pub use model::{Conditioning, FluxLoad, FluxModel, GgufWeights};
pub use redux::{append_image_tokens, ReduxDims, ReduxImageEncoder};
pub use stream::{BlockId, BlockSource, HostBlocks};
pub use xlabs::{XlabsDims, XlabsHook, XlabsIpAdapter};
