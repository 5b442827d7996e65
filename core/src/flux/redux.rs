//! FLUX.1 Redux: BFL's image prompt that enters Flux as extra text tokens.
//! SigLIP so400m's token sequence (`last_hidden_state` after `post_layernorm`,
//! 729 × 1152 at 384²) goes through `redux_down(silu(redux_up(x)))` to 729
//! tokens of T5's width (4096), appended after the prompt's T5 tokens; each
//! Redux image adds its own 729. Written after diffusers' `ReduxImageEncoder`
//! and ComfyUI's `StyleModelApply` (strength type "multiply": the image tokens,
//! not the prompt's, are scaled by the strength).
//!
//! What it does not do: it neither encodes the image (that is SigLIP's
//! [`crate::siglip`]) nor conditions the negative prompt (ComfyUI applies a
//! style model to the positive conditioning only; so does the pipeline).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result, TensorProblem};
use crate::nn::Linear;
use crate::weights::TensorStore;

/// Sizes read from the checkpoint's shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReduxDims {
    /// SigLIP's hidden size (1152 for so400m).
    pub siglip_dim: usize,
    /// `redux_up`'s outputs (3 × 4096 in BFL's file).
    pub hidden: usize,
    /// The tokens' width: Flux's context width (T5's 4096).
    pub context_dim: usize,
}

impl ReduxDims {
    /// Infers the sizes from `redux_up.weight` `[hidden, siglip]` and `redux_down.weight` `[context, hidden]`.
    pub fn infer(store: &TensorStore) -> Result<Self> {
        let shape = |name: &str| match store.shape(name) {
            Some([rows, cols]) => Ok((*rows, *cols)),
            found => Err(Error::Checkpoint {
                source_name: store.source_name.clone(),
                problems: vec![match found {
                    None => TensorProblem::Missing { name: name.into(), expected: vec![] },
                    Some(s) => TensorProblem::WrongShape { name: name.into(), expected: vec![0, 0], found: s.to_vec() },
                }],
            }),
        };
        let (hidden, siglip_dim) = shape("redux_up.weight")?;
        let (context_dim, _) = shape("redux_down.weight")?;
        Ok(Self { siglip_dim, hidden, context_dim })
    }

    /// Every tensor of a Redux checkpoint with its shape.
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        vec![
            ("redux_up.weight".into(), vec![self.hidden, self.siglip_dim]),
            ("redux_up.bias".into(), vec![self.hidden]),
            ("redux_down.weight".into(), vec![self.context_dim, self.hidden]),
            ("redux_down.bias".into(), vec![self.context_dim]),
        ]
    }
}

/// The two linear layers; fields mirror the checkpoint's names.
pub struct ReduxImageEncoder {
    pub dims: ReduxDims,
    redux_up: Linear,
    redux_down: Linear,
}

impl ReduxImageEncoder {
    /// From `flux1-redux-dev.safetensors` (or diffusers' `image_embedder/`: the same names),
    /// every tensor checked up front.
    pub fn from_store(store: &TensorStore, dtype: DType, device: &Device) -> Result<Self> {
        let dims = ReduxDims::infer(store)?;
        store.validate(&dims.expected_tensors())?;
        let vb = store.var_builder(dtype, device);
        Ok(Self {
            dims,
            redux_up: Linear::new(dims.siglip_dim, dims.hidden, vb.pp("redux_up"))?,
            redux_down: Linear::new(dims.hidden, dims.context_dim, vb.pp("redux_down"))?,
        })
    }

    /// SigLIP tokens `[B, N, siglip_dim]` → Flux text tokens `[B, N, context_dim]`.
    pub fn forward(&self, siglip_tokens: &Tensor) -> Result<Tensor> {
        let x = siglip_tokens.to_dtype(self.redux_up.dtype())?;
        self.redux_down.forward(&candle_nn::ops::silu(&self.redux_up.forward(&x)?)?)
    }
}

/// The prompt's T5 tokens `[1, L, C]` followed by each image's Redux tokens
/// `[1, N, C]` times `strength` (ComfyUI's "multiply"), in the prompt's dtype.
pub fn append_image_tokens(txt: &Tensor, images: &[(Tensor, f64)]) -> Result<Tensor> {
    if images.is_empty() {
        return Ok(txt.clone());
    }
    let mut parts = vec![txt.clone()];
    for (tokens, strength) in images {
        let (_, _, c) = tokens.dims3()?;
        let (_, _, want) = txt.dims3()?;
        if c != want {
            return Err(Error::Shape(format!(
                "Redux tokens are {c} wide but this Flux's text tokens are {want}: the Redux model is for another Flux"
            )));
        }
        parts.push((tokens.to_dtype(txt.dtype())? * *strength)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(up: (usize, usize), down: (usize, usize)) -> TensorStore {
        let mut s = TensorStore::new("redux.safetensors");
        let dev = Device::Cpu;
        s.insert("redux_up.weight", Tensor::ones(up, DType::F32, &dev).unwrap()).unwrap();
        s.insert("redux_up.bias", Tensor::zeros(up.0, DType::F32, &dev).unwrap()).unwrap();
        s.insert("redux_down.weight", Tensor::ones(down, DType::F32, &dev).unwrap()).unwrap();
        s.insert("redux_down.bias", Tensor::zeros(down.0, DType::F32, &dev).unwrap()).unwrap();
        s
    }

    #[test]
    fn sizes_come_from_the_shapes_and_a_mismatch_is_named() {
        let r = ReduxImageEncoder::from_store(&store((6, 4), (2, 6)), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(r.dims, ReduxDims { siglip_dim: 4, hidden: 6, context_dim: 2 });
        let x = Tensor::ones((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        // silu(4) · 6 per output: every path counted once.
        let y = r.forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = 6.0 * 4.0 / (1.0 + (-4f32).exp());
        assert!(y.iter().all(|v| (v - want).abs() < 1e-4), "{y:?}");
        let e = ReduxImageEncoder::from_store(&store((6, 4), (2, 5)), DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("redux_down.weight"), "{e}");
        let e = ReduxImageEncoder::from_store(&TensorStore::new("x"), DType::F32, &Device::Cpu).err().unwrap();
        assert!(e.to_string().contains("redux_up.weight"), "{e}");
    }

    #[test]
    fn image_tokens_follow_the_prompt_scaled() {
        let dev = Device::Cpu;
        let txt = Tensor::ones((1, 2, 3), DType::F32, &dev).unwrap();
        let img = Tensor::full(2f32, (1, 4, 3), &dev).unwrap();
        let out = append_image_tokens(&txt, &[(img.clone(), 0.5), (img, 2.0)]).unwrap();
        assert_eq!(out.dims(), &[1, 10, 3]);
        let rows: Vec<f32> = out.get(0).unwrap().max(1).unwrap().to_vec1().unwrap();
        assert_eq!(rows, vec![1., 1., 1., 1., 1., 1., 4., 4., 4., 4.]);
        let wide = Tensor::ones((1, 4, 5), DType::F32, &dev).unwrap();
        assert!(append_image_tokens(&txt, &[(wide, 1.0)]).unwrap_err().to_string().contains("another Flux"));
    }
}
