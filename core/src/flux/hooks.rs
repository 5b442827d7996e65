//! Typed injection points in the Flux blocks.
//!
//! Adapters never replace a block's forward. Each block calls the registered
//! hooks at one place:
//! - **double block**: the image stream's attention output, before its output
//!   projection (`img_attn.proj`); the hook sees the image tokens' query;
//! - **single block**: the attention output of all tokens (text first), before
//!   `linear2`; the hook sees the query of all tokens.
//!
//! The query is the block's own, after the QK RMSNorm and before RoPE — what
//! InstantX's processor uses as `ip_query`. Hooks run in registration order,
//! each receiving the output of the previous one, so adapters stack.

use candle_core::Tensor;

use crate::error::Result;

/// Which block is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    /// Double-stream block `index` (0..19 in FLUX.1).
    Double { index: usize },
    /// Single-stream block `index` (0..38 in FLUX.1).
    Single { index: usize },
}

impl Site {
    /// Position over all blocks, double blocks first (the IP-Adapter's processor index).
    pub fn global_index(self, depth: usize) -> usize {
        match self {
            Self::Double { index } => index,
            Self::Single { index } => depth + index,
        }
    }
}

/// Where and when a hook is called.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HookPoint {
    pub site: Site,
    /// Number of double-stream blocks of the model (to number all blocks).
    pub depth: usize,
    /// Current sigma (= the flow-matching timestep in [0, 1]).
    pub sigma: f64,
    /// Sampler step, counted from 0 (every model call of one step shares it).
    pub step: usize,
    /// Number of text tokens in front of the image tokens (single blocks see both).
    pub txt_len: usize,
}

/// An adapter that modifies a block's attention output.
pub trait AttentionHook: Send + Sync {
    /// Short name for logs and errors.
    fn name(&self) -> &str;

    /// `q`: `[B, H, L, D]`, QK-normed, before RoPE. `attn`: `[B, L, H·D]`, the
    /// attention output of the same tokens before the output projection.
    /// Returns the new attention output, or `None` to leave it unchanged
    /// (e.g. outside the adapter's sigma window).
    fn attention(&self, at: &HookPoint, q: &Tensor, attn: &Tensor) -> Result<Option<Tensor>>;
}

/// The hooks of one model call, in order.
#[derive(Default, Clone, Copy)]
pub struct Hooks<'a> {
    pub list: &'a [&'a dyn AttentionHook],
}

impl<'a> Hooks<'a> {
    pub fn new(list: &'a [&'a dyn AttentionHook]) -> Self {
        Self { list }
    }

    pub fn none() -> Self {
        Self { list: &[] }
    }

    /// Runs every hook on `attn`.
    /// No hook registered: the model need not keep the pre-RoPE query.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn apply(&self, at: &HookPoint, q: &Tensor, attn: Tensor) -> Result<Tensor> {
        let mut attn = attn;
        for hook in self.list {
            if let Some(next) = hook.attention(at, q, &attn)? {
                if next.dims() != attn.dims() {
                    return Err(crate::Error::Shape(format!(
                        "hook `{}` returned {:?} for an attention output of {:?}",
                        hook.name(),
                        next.dims(),
                        attn.dims()
                    )));
                }
                attn = next;
            }
        }
        Ok(attn)
    }
}

impl std::fmt::Debug for Hooks<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.list.iter().map(|h| h.name())).finish()
    }
}
