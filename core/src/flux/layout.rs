//! The two checkpoint layouts of a Flux transformer, mapped onto one set of
//! canonical (BFL) tensor names.
//!
//! - **BFL** single file (`flux1-dev.safetensors`, also under ComfyUI's
//!   `model.diffusion_model.` prefix): `double_blocks.N.img_attn.qkv.weight`, ...
//! - **diffusers** folder (`transformer/diffusion_pytorch_model-*.safetensors`):
//!   `transformer_blocks.N.attn.to_q.weight`, ...; Q, K, V (and the single
//!   blocks' MLP input) are separate tensors that BFL stores concatenated, and
//!   the final modulation stores (scale, shift) where BFL stores (shift, scale).
//!
//! The mapping follows diffusers' `convert_flux_transformer_checkpoint_to_diffusers`,
//! read backwards. Everything is checked (all problems at once) before any
//! tensor is rearranged.

use std::collections::BTreeSet;

use candle_core::Tensor;

use super::config::{FluxConfig, FLUX_THETA};
use crate::error::{Error, Result, TensorProblem};
use crate::weights::TensorStore;

/// Which naming a Flux checkpoint uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FluxLayout {
    Bfl,
    Diffusers,
}

/// ComfyUI's full-checkpoint prefix for the diffusion model.
const COMFY_PREFIX: &str = "model.diffusion_model.";

impl FluxLayout {
    /// Tells the layout from the tensor names; strips ComfyUI's prefix (dropping
    /// the VAE and text encoders such a file also holds).
    pub fn detect(store: TensorStore) -> Result<(Self, TensorStore)> {
        let store = if store.names().any(|n| n.starts_with(COMFY_PREFIX)) {
            store.filter_rename(|n| n.strip_prefix(COMFY_PREFIX).map(str::to_string))
        } else {
            store
        };
        if store.names().any(|n| n.starts_with("scaled_fp8") || n.ends_with(".scale_weight")) {
            return Err(Error::Unsupported(format!(
                "{}: ComfyUI's scaled-fp8 Flux files are not supported; use the plain fp8-e4m3, bf16 or fp16 file",
                store.source_name
            )));
        }
        let layout = if store.names().any(|n| n.starts_with("double_blocks.") || n == "img_in.weight") {
            Self::Bfl
        } else if store.names().any(|n| n.starts_with("transformer_blocks.") || n == "x_embedder.weight") {
            Self::Diffusers
        } else {
            return Err(Error::Format {
                source_name: store.source_name.clone(),
                format: "Flux transformer",
                reason: "neither BFL (`double_blocks.*`, `img_in.*`) nor diffusers (`transformer_blocks.*`, \
                         `x_embedder.*`) tensor names found"
                    .into(),
            });
        };
        Ok((layout, store))
    }

    /// The tensors (and the rows of each, along dim 0) that hold canonical `name`, in order.
    pub(super) fn sources(self, name: &str, hidden: usize, mlp: usize) -> Vec<(String, usize)> {
        if self == Self::Bfl {
            return vec![(name.to_string(), 0)];
        }
        let (stem, leaf) = match name.rsplit_once('.') {
            Some((s, l)) if l == "weight" || l == "bias" => (s, Some(l)),
            _ => (name, None),
        };
        let join = |p: &str| leaf.map_or_else(|| p.to_string(), |l| format!("{p}.{l}"));
        let one = |p: &str| vec![(join(p), 0)];
        let mut parts = stem.splitn(3, '.');
        let (a, b, c) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        match (a, b, c) {
            ("double_blocks", i, rest) => {
                let p = |s: &str| format!("transformer_blocks.{i}.{s}");
                let qkv = |names: [&str; 3]| names.iter().map(|s| (join(&p(s)), hidden)).collect();
                match rest {
                    "img_mod.lin" => one(&p("norm1.linear")),
                    "txt_mod.lin" => one(&p("norm1_context.linear")),
                    "img_attn.qkv" => qkv(["attn.to_q", "attn.to_k", "attn.to_v"]),
                    "img_attn.norm.query_norm.scale" => one(&p("attn.norm_q.weight")),
                    "img_attn.norm.key_norm.scale" => one(&p("attn.norm_k.weight")),
                    "img_attn.proj" => one(&p("attn.to_out.0")),
                    "txt_attn.qkv" => qkv(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
                    "txt_attn.norm.query_norm.scale" => one(&p("attn.norm_added_q.weight")),
                    "txt_attn.norm.key_norm.scale" => one(&p("attn.norm_added_k.weight")),
                    "txt_attn.proj" => one(&p("attn.to_add_out")),
                    "img_mlp.0" => one(&p("ff.net.0.proj")),
                    "img_mlp.2" => one(&p("ff.net.2")),
                    "txt_mlp.0" => one(&p("ff_context.net.0.proj")),
                    "txt_mlp.2" => one(&p("ff_context.net.2")),
                    _ => one(name),
                }
            }
            ("single_blocks", i, rest) => {
                let p = |s: &str| format!("single_transformer_blocks.{i}.{s}");
                match rest {
                    "linear1" => ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                        .iter()
                        .zip([hidden, hidden, hidden, mlp])
                        .map(|(s, rows)| (join(&p(s)), rows))
                        .collect(),
                    "linear2" => one(&p("proj_out")),
                    "norm.query_norm.scale" => one(&p("attn.norm_q.weight")),
                    "norm.key_norm.scale" => one(&p("attn.norm_k.weight")),
                    "modulation.lin" => one(&p("norm.linear")),
                    _ => one(name),
                }
            }
            _ => match stem {
                "img_in" => one("x_embedder"),
                "txt_in" => one("context_embedder"),
                "time_in.in_layer" => one("time_text_embed.timestep_embedder.linear_1"),
                "time_in.out_layer" => one("time_text_embed.timestep_embedder.linear_2"),
                "vector_in.in_layer" => one("time_text_embed.text_embedder.linear_1"),
                "vector_in.out_layer" => one("time_text_embed.text_embedder.linear_2"),
                "guidance_in.in_layer" => one("time_text_embed.guidance_embedder.linear_1"),
                "guidance_in.out_layer" => one("time_text_embed.guidance_embedder.linear_2"),
                "final_layer.linear" => one("proj_out"),
                "final_layer.adaLN_modulation.1" => one("norm_out.linear"),
                _ => one(name),
            },
        }
    }

    /// diffusers' `AdaLayerNormContinuous` stores (scale, shift); BFL (shift, scale).
    pub(super) fn swaps_halves(self, name: &str) -> bool {
        self == Self::Diffusers && name.starts_with("final_layer.adaLN_modulation.1.")
    }

    fn source_name(self, name: &str) -> String {
        self.sources(name, 0, 0).into_iter().next().map_or_else(|| name.to_string(), |(n, _)| n)
    }

    /// Sizes from tensor shapes (the ones every Flux has are required); the head
    /// count comes from the QK-norm size. RoPE axes are not in a checkpoint: the
    /// config has none until [`FluxConfig::with_axes`].
    pub fn infer(self, store: &TensorStore) -> Result<FluxConfig> {
        self.infer_sizes(store, true)
    }

    /// [`Self::infer`] for a model without Flux's final layer (a ControlNet's
    /// blocks): `out_channels` is 0.
    pub(super) fn infer_without_final_layer(self, store: &TensorStore) -> Result<FluxConfig> {
        self.infer_sizes(store, false)
    }

    fn infer_sizes(self, store: &TensorStore, final_layer: bool) -> Result<FluxConfig> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            let src = self.source_name(name);
            store.shape(&src).map(<[usize]>::to_vec).ok_or_else(|| Error::Checkpoint {
                source_name: store.source_name.clone(),
                problems: vec![TensorProblem::Missing { name: src, expected: vec![] }],
            })
        };
        let dim = |name: &str, i: usize| -> Result<usize> {
            let s = shape(name)?;
            s.get(i).copied().ok_or_else(|| {
                Error::Shape(format!("{}: `{}` has shape {s:?}", store.source_name, self.source_name(name)))
            })
        };
        let count = |prefix: &str| -> usize {
            let idx: BTreeSet<usize> =
                store.names().filter_map(|n| n.strip_prefix(prefix)?.split('.').next()?.parse().ok()).collect();
            idx.iter().next_back().map_or(0, |m| m + 1)
        };
        let (double_prefix, single_prefix) = match self {
            Self::Bfl => ("double_blocks.", "single_blocks."),
            Self::Diffusers => ("transformer_blocks.", "single_transformer_blocks."),
        };
        let depth = count(double_prefix);
        let depth_single = count(single_prefix);
        let hidden_size = dim("img_in.weight", 0)?;
        let (mlp_hidden, head_dim) = if depth > 0 {
            (dim("double_blocks.0.img_mlp.0.weight", 0)?, dim("double_blocks.0.img_attn.norm.query_norm.scale", 0)?)
        } else {
            let rows = match self {
                Self::Bfl => dim("single_blocks.0.linear1.weight", 0)?.saturating_sub(3 * hidden_size),
                Self::Diffusers => dim_of(store, "single_transformer_blocks.0.proj_mlp.weight", 0).unwrap_or(0),
            };
            (rows, dim("single_blocks.0.norm.query_norm.scale", 0)?)
        };
        Ok(FluxConfig {
            in_channels: dim("img_in.weight", 1)?,
            out_channels: if final_layer { dim("final_layer.linear.weight", 0)? } else { 0 },
            vec_in_dim: dim("vector_in.in_layer.weight", 1)?,
            context_in_dim: dim("txt_in.weight", 1)?,
            hidden_size,
            mlp_hidden,
            num_heads: hidden_size / head_dim.max(1),
            depth,
            depth_single,
            axes_dim: Vec::new(),
            theta: FLUX_THETA,
            guidance_embed: store.contains(&self.source_name("guidance_in.in_layer.weight")),
        })
    }

    /// Checks every tensor the model needs (names in this layout, shapes) and
    /// that nothing else is there; all problems in one error. Then builds the
    /// canonical tensors, concatenating and reordering as needed: those that
    /// need it are read now, the others move over unread (a store made from
    /// shared bytes is read tensor by tensor as the model takes them).
    pub fn canonicalize(
        self,
        mut store: TensorStore,
        canonical: &[(String, Vec<usize>)],
        hidden: usize,
        mlp: usize,
    ) -> Result<TensorStore> {
        let mut expected = Vec::new();
        for (name, shape) in canonical {
            for (src, rows) in self.sources(name, hidden, mlp) {
                let mut s = shape.clone();
                if rows > 0 {
                    s[0] = rows;
                }
                expected.push((src, s));
            }
        }
        store.validate(&expected)?;
        let mut out = TensorStore::new(store.source_name.clone());
        for (name, _) in canonical {
            let sources = self.sources(name, hidden, mlp);
            if let ([(src, _)], false) = (sources.as_slice(), self.swaps_halves(name)) {
                store.move_to(src, &mut out, name.clone())?;
                continue;
            }
            let mut parts = Vec::new();
            for (src, _) in sources {
                parts.push(store.take(&src)?.ok_or_else(|| Error::Checkpoint {
                    source_name: store.source_name.clone(),
                    problems: vec![TensorProblem::Missing { name: src, expected: vec![] }],
                })?);
            }
            let t = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 0)? };
            let t = if self.swaps_halves(name) {
                let n = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, n, n)?, t.narrow(0, 0, n)?], 0)?
            } else {
                t
            };
            out.insert(name.clone(), t)?;
        }
        Ok(out)
    }
}

fn dim_of(store: &TensorStore, name: &str, i: usize) -> Option<usize> {
    store.shape(name).and_then(|s| s.get(i).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names_follow_the_converter() {
        let d = FluxLayout::Diffusers;
        let names = |n: &str| d.sources(n, 8, 32).into_iter().collect::<Vec<_>>();
        assert_eq!(
            names("double_blocks.3.img_attn.qkv.bias"),
            vec![
                ("transformer_blocks.3.attn.to_q.bias".to_string(), 8),
                ("transformer_blocks.3.attn.to_k.bias".to_string(), 8),
                ("transformer_blocks.3.attn.to_v.bias".to_string(), 8)
            ]
        );
        assert_eq!(
            names("single_blocks.0.linear1.weight")[3],
            ("single_transformer_blocks.0.proj_mlp.weight".into(), 32)
        );
        assert_eq!(
            names("double_blocks.0.txt_attn.norm.key_norm.scale")[0].0,
            "transformer_blocks.0.attn.norm_added_k.weight"
        );
        assert_eq!(names("final_layer.adaLN_modulation.1.weight")[0].0, "norm_out.linear.weight");
        assert!(d.swaps_halves("final_layer.adaLN_modulation.1.bias"));
        assert!(!FluxLayout::Bfl.swaps_halves("final_layer.adaLN_modulation.1.bias"));
    }

    #[test]
    fn a_mapped_bfl_checkpoint_is_read_only_as_the_model_takes_it() {
        use super::super::model::{canonical_tensors, FluxModel};
        use super::super::testing::{inputs, random_map, run, tiny};
        use candle_core::{DType, Device};
        let cfg = tiny();
        let map = random_map(&cfg);
        let bytes = safetensors::serialize(map.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
        let shared: crate::weights::SharedBytes = std::sync::Arc::new(bytes);
        let store = TensorStore::from_safetensors_shared(shared.clone(), "flux.safetensors").unwrap();
        let (layout, store) = FluxLayout::detect(store).unwrap();
        assert_eq!(layout, FluxLayout::Bfl);
        // Sizes come from the header; BFL names are canonical, so every tensor moves over unread.
        assert_eq!(layout.infer(&store).unwrap().hidden_size, cfg.hidden_size);
        let canonical = layout.canonicalize(store, &canonical_tensors(&cfg), cfg.hidden_size, cfg.mlp_hidden).unwrap();
        assert_eq!((canonical.read_bytes(), canonical.len()), (0, map.len()));
        // The model read from the mapped bytes computes what the in-memory one does.
        let mapped = TensorStore::from_safetensors_shared(shared, "flux.safetensors").unwrap();
        let from_map = FluxModel::from_canonical(cfg.clone(), map, DType::F32, &Device::Cpu).unwrap();
        let from_bytes = FluxModel::from_store(mapped, Some(cfg.axes_dim.clone()), DType::F32, &Device::Cpu).unwrap();
        let x = inputs(&cfg);
        assert_eq!(run(&from_bytes, &x).unwrap(), run(&from_map, &x).unwrap());
    }
}
