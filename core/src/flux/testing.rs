//! Shared by the flux modules' tests: a tiny random Flux and its inputs.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use super::hooks::Hooks;
use super::model::{canonical_tensors, Conditioning, FluxModel};
use super::sampler::{img_ids, token_grid};
use super::FluxConfig;

pub fn tiny() -> FluxConfig {
    FluxConfig {
        in_channels: 8,
        out_channels: 8,
        vec_in_dim: 6,
        context_in_dim: 10,
        hidden_size: 16,
        mlp_hidden: 32,
        num_heads: 2,
        depth: 2,
        depth_single: 3,
        axes_dim: vec![2, 2, 4],
        ..FluxConfig::dev()
    }
}

pub fn random_map(cfg: &FluxConfig) -> BTreeMap<String, Tensor> {
    canonical_tensors(cfg)
        .into_iter()
        .map(|(name, shape)| (name, Tensor::randn(0f32, 0.3, shape.as_slice(), &Device::Cpu).unwrap()))
        .collect()
}

pub fn random_model(cfg: &FluxConfig) -> FluxModel {
    FluxModel::from_canonical(cfg.clone(), random_map(cfg), DType::F32, &Device::Cpu).unwrap()
}

/// Latents of a 64×32 image and conditioning, random once per test.
pub struct Inputs {
    pub img: Tensor,
    pub ids: Vec<[f32; 3]>,
    pub cond: Conditioning,
}

pub fn inputs(cfg: &FluxConfig) -> Inputs {
    let dev = Device::Cpu;
    let (rows, cols) = token_grid(64, 32);
    Inputs {
        img: Tensor::randn(0f32, 1.0, (1, rows * cols, cfg.in_channels), &dev).unwrap(),
        ids: img_ids(rows, cols),
        cond: Conditioning {
            txt: Tensor::randn(0f32, 1.0, (1, 5, cfg.context_in_dim), &dev).unwrap(),
            y: Tensor::randn(0f32, 1.0, (1, cfg.vec_in_dim), &dev).unwrap(),
            guidance: Some(3.5),
        },
    }
}

pub fn run(model: &FluxModel, x: &Inputs) -> crate::Result<Vec<f32>> {
    let out = model.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::none())?;
    Ok(out.flatten_all()?.to_vec1::<f32>()?)
}
