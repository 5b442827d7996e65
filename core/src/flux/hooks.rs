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
//! InstantX's processor uses as `ip_query`. A double block also asks its
//! hooks for a term added to the image stream's output after its MLP
//! ([`AttentionHook::block_output`]: where XLabs' IP-Adapter adds its own). Hooks run in registration order,
//! each receiving the output of the previous one, so adapters stack.
//!
//! A hook may also say what it would do ([`AttentionHook::contribution`]):
//! when a call's whole effect is one extra attention term (one IP-Adapter
//! image in its window), a fused attention kernel computes it inside the
//! block's own attention launch instead ([`Hooks::single_term`]).

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

    /// What [`Self::attention`] would do at `at`, where the hook can say so
    /// without running (`q`: the block's pre-RoPE query, all its tokens; only
    /// its batch, heads and head size matter). Lets the model compute a
    /// single attention term inside the block's own attention kernel. The
    /// default, [`Contribution::Other`], always runs [`Self::attention`].
    fn contribution(&self, _at: &HookPoint, _q: &Tensor) -> Result<Contribution> {
        Ok(Contribution::Other)
    }

    /// A double block's term `[B, L_img, H·D]` added to its image stream's
    /// output after the MLP residual, ungated (XLabs' IP-Adapter, as diffusers'
    /// `FluxIPAdapterAttnProcessor` and XLabs' `IPDoubleStreamBlockProcessor`
    /// add it), from the image tokens' pre-RoPE query `q [B, H, L_img, D]`.
    /// `None` (the default): nothing.
    fn block_output(&self, _at: &HookPoint, _q: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A hook's effect at one hook point ([`AttentionHook::contribution`]).
#[derive(Debug, Clone)]
pub enum Contribution {
    /// Leaves the attention output unchanged (outside its window, weight 0).
    Nothing,
    /// Adds `scale · softmax(q kᵀ/√D) v` (heads merged) to the rows the hook
    /// sees, `q` being its pre-RoPE query: `k, v [B, H, S, D]`, already
    /// broadcast to the query's batch.
    Attention { k: Tensor, v: Tensor, scale: f64 },
    /// Anything else.
    Other,
}

/// The one attention term that is the whole effect of a call's hooks
/// ([`Hooks::single_term`]).
#[derive(Debug, Clone)]
pub struct HookTerm {
    pub k: Tensor,
    pub v: Tensor,
    pub scale: f64,
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

    /// No hook registered: the model need not keep the pre-RoPE query.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The hooks' whole effect at `at` when it is exactly one attention term
    /// (every other hook contributing nothing), else `None` (no hook, several
    /// terms, or one that must run): then the model calls [`Self::apply`].
    /// Terms add, so running them inside the attention instead of after it
    /// changes only the order of the additions.
    pub fn single_term(&self, at: &HookPoint, q: &Tensor) -> Result<Option<HookTerm>> {
        let mut term = None;
        for hook in self.list {
            match hook.contribution(at, q)? {
                Contribution::Nothing => {}
                Contribution::Attention { k, v, scale } if term.is_none() => term = Some(HookTerm { k, v, scale }),
                Contribution::Attention { .. } | Contribution::Other => return Ok(None),
            }
        }
        Ok(term)
    }

    /// The sum of the hooks' [`AttentionHook::block_output`] terms at `at`; `None` when none adds one.
    pub fn block_output(&self, at: &HookPoint, q: &Tensor) -> Result<Option<Tensor>> {
        let mut sum: Option<Tensor> = None;
        for hook in self.list {
            if let Some(t) = hook.block_output(at, q)? {
                sum = Some(match sum {
                    Some(s) => (s + t)?,
                    None => t,
                });
            }
        }
        Ok(sum)
    }

    /// Runs every hook on `attn`.
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// A hook that only reports a fixed contribution.
    struct Says(fn() -> Contribution);

    impl AttentionHook for Says {
        fn name(&self) -> &str {
            "says"
        }
        fn attention(&self, _: &HookPoint, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
            Ok(None)
        }
        fn contribution(&self, _: &HookPoint, _: &Tensor) -> Result<Contribution> {
            Ok((self.0)())
        }
    }

    fn term() -> Contribution {
        let t = Tensor::zeros((1, 2, 3, 4), candle_core::DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        Contribution::Attention { k: t.clone(), v: t, scale: 0.5 }
    }

    #[test]
    fn single_term_only_when_the_hooks_add_exactly_one_attention() {
        let at = HookPoint { site: Site::Single { index: 0 }, depth: 2, sigma: 0.5, step: 0, txt_len: 0 };
        let q = Tensor::zeros((1, 2, 5, 4), candle_core::DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        let (nothing, one, other) = (Says(|| Contribution::Nothing), Says(term), Says(|| Contribution::Other));
        let single = |list: &[&dyn AttentionHook]| Hooks::new(list).single_term(&at, &q).map(|t| t.map(|t| t.scale));
        assert_eq!(single(&[&nothing, &one, &nothing]).ok(), Some(Some(0.5)));
        assert_eq!(single(&[&one]).ok(), Some(Some(0.5)));
        assert_eq!(single(&[&one, &one]).ok(), Some(None), "two terms");
        assert_eq!(single(&[&one, &other]).ok(), Some(None), "a hook that must run");
        assert_eq!(single(&[&nothing]).ok(), Some(None), "no term");
        assert_eq!(single(&[]).ok(), Some(None));
    }
}
