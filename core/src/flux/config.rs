//! Flux transformer hyper-parameters: presets for FLUX.1 dev/schnell and
//! inference of every size from a checkpoint's tensor shapes.

use crate::error::{Error, Result};

/// Sizes of a Flux transformer, named as in BFL's `FluxParams`.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    /// Packed latent channels per token (16 latent channels × 2×2 patch = 64).
    pub in_channels: usize,
    /// Channels the final layer predicts per token (= `in_channels` for FLUX.1).
    pub out_channels: usize,
    /// Width of the pooled text vector (CLIP-L: 768).
    pub vec_in_dim: usize,
    /// Width of the text tokens (T5-XXL: 4096).
    pub context_in_dim: usize,
    pub hidden_size: usize,
    /// Width of each block's MLP (4 × hidden for FLUX.1).
    pub mlp_hidden: usize,
    pub num_heads: usize,
    /// Number of double-stream blocks (19).
    pub depth: usize,
    /// Number of single-stream blocks (38).
    pub depth_single: usize,
    /// RoPE sizes per position axis (index, row, column); they sum to the head size.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    /// dev has a guidance embedding; schnell does not.
    pub guidance_embed: bool,
}

/// RoPE base of FLUX.1.
pub const FLUX_THETA: f64 = 10_000.0;
/// RoPE axes of FLUX.1 (head size 128).
pub const FLUX_AXES_DIM: [usize; 3] = [16, 56, 56];

impl FluxConfig {
    /// FLUX.1-dev (guidance-distilled).
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            out_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_hidden: 12288,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            axes_dim: FLUX_AXES_DIM.to_vec(),
            theta: FLUX_THETA,
            guidance_embed: true,
        }
    }

    /// FLUX.1-schnell (timestep-distilled, no guidance embedding).
    pub fn schnell() -> Self {
        Self { guidance_embed: false, ..Self::dev() }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// Total number of blocks (19 + 38 = 57): the IP-Adapter has one processor per block.
    pub fn num_blocks(&self) -> usize {
        self.depth + self.depth_single
    }

    /// Checks that the sizes are consistent with each other.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Unsupported(format!("inconsistent Flux config: {reason}")));
        if self.num_heads == 0 || self.hidden_size % self.num_heads != 0 {
            return bad(format!("hidden size {} is not a multiple of {} heads", self.hidden_size, self.num_heads));
        }
        let rope: usize = self.axes_dim.iter().sum();
        if rope != self.head_dim() || self.axes_dim.iter().any(|d| d % 2 != 0) {
            return bad(format!(
                "RoPE axes {:?} must be even and sum to the head size {}",
                self.axes_dim,
                self.head_dim()
            ));
        }
        Ok(())
    }
}

impl FluxConfig {
    /// Resolves the RoPE axes of a config inferred from a checkpoint (which has
    /// none): `axes_dim` if given, else FLUX.1's for head size 128; then checks it.
    pub fn with_axes(mut self, axes_dim: Option<Vec<usize>>) -> Result<Self> {
        self.axes_dim = match axes_dim {
            Some(a) => a,
            None if self.head_dim() == FLUX_AXES_DIM.iter().sum::<usize>() => FLUX_AXES_DIM.to_vec(),
            None => {
                return Err(Error::Unsupported(format!(
                    "head size {} is not FLUX.1's 128: give the RoPE axes (diffusers' `axes_dims_rope`)",
                    self.head_dim()
                )))
            }
        };
        self.check()?;
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_consistent() {
        for cfg in [FluxConfig::dev(), FluxConfig::schnell()] {
            cfg.check().unwrap();
            assert_eq!((cfg.head_dim(), cfg.num_blocks()), (128, 57));
        }
        assert!(!FluxConfig::schnell().guidance_embed);
    }

    #[test]
    fn bad_rope_axes_are_refused() {
        let cfg = FluxConfig { axes_dim: vec![16, 56, 54], ..FluxConfig::dev() };
        assert!(cfg.check().unwrap_err().to_string().contains("RoPE axes"));
    }
}
