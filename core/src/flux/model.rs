//! The Flux transformer (MMDiT): double-stream blocks over text and image
//! tokens, then single-stream blocks over both, with AdaLN modulation from
//! the timestep, guidance and pooled text vector, and 3-axis RoPE.
//!
//! Written after BFL's reference (`flux/model.py`, `flux/modules/layers.py`)
//! and checked against diffusers' `FluxTransformer2DModel`. Field names mirror
//! BFL's checkpoint keys. Norms, RoPE and softmax compute in f32; matmuls in
//! the model dtype. fp8-e4m3 weights stay fp8 in memory and are upcast to the
//! model dtype by each layer as it runs. ControlNets' residuals join the
//! image stream after the blocks they feed ([`FluxModel::forward_controlled`]);
//! a ControlNet's own blocks are a `FluxModel` without the final layer.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, D};

use super::config::FluxConfig;
use super::controlnet::ControlResiduals;
use super::hooks::{HookPoint, Hooks, Site};
use super::layout::FluxLayout;
use super::lora::{self, FluxLora};
use super::stream::{BlockId, BlockSource};
use crate::error::{Error, Result};
use crate::nn::{
    add_bias, cat_bias_gelu, cat_linear_gelu, gated_add, linear_gelu, modulate, rms_norm_scaled, Attention,
    ExtraAttention, FusedModulation, LayerNorm, Linear, QkvInput, QkvOut, QkvStreams,
};
use crate::weights::TensorStore;

/// QK RMSNorm epsilon (BFL's `RMSNorm`).
const QK_NORM_EPS: f64 = 1e-6;
/// Epsilon of the affine-free LayerNorms.
const LN_EPS: f64 = 1e-6;
/// Width of the sinusoidal timestep / guidance embedding.
const TIME_EMBED_DIM: usize = 256;
/// BFL's `time_factor`: timesteps in [0, 1] are scaled to [0, 1000].
const TIME_FACTOR: f32 = 1000.0;

/// How a GGUF checkpoint's quantized weights are held once Flux is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GgufWeights {
    /// As stored, on the model's device; each layer dequantizes its weight to
    /// the model dtype when it runs (ComfyUI-GGUF's way): about the memory of
    /// the quantized file, and a dequantization per layer per step.
    #[default]
    Quantized,
    /// Dequantized to the model dtype as they load: the memory of a dense
    /// model, no work per step.
    Dequantized,
}

/// How to load Flux ([`FluxModel::from_store_with`]).
#[derive(Debug, Clone)]
pub struct FluxLoad<'a> {
    /// The compute dtype (f32, bf16 or f16).
    pub dtype: DType,
    pub device: &'a Device,
    /// Blocks whose tensors stay where they are, for a [`BlockSource`].
    pub streamed: &'a [BlockId],
    pub gguf: GgufWeights,
    /// LoRAs applied as the weights load (each with its strength).
    pub loras: &'a [FluxLora],
}

/// Tensors by canonical name, converted to the model dtype on the model device
/// as they are taken. Taking removes them, so a layer's source tensor is freed
/// as soon as the layer holds its own copy: loading peaks at about one model
/// plus one layer, not two models.
pub(super) struct Weights {
    source: WeightSource,
    dtype: DType,
    device: Device,
    gguf: GgufWeights,
    /// Applied to the linear layers as they are taken (none for a streamed
    /// block's fetch: its tensors were merged when the model loaded).
    loras: Vec<FluxLora>,
}

/// Where [`Weights`] takes tensors from, by canonical name.
enum WeightSource {
    /// A loaded checkpoint: each tensor is read (from a mapped file) as it is taken.
    Store(TensorStore),
    /// Tensors already in memory (a streamed block's, fetched each step).
    Map(BTreeMap<String, Tensor>),
}

impl Weights {
    /// Tensors taken from `store` (canonical names), without LoRAs.
    pub(super) fn from_store(store: TensorStore, dtype: DType, device: &Device) -> Self {
        Self {
            source: WeightSource::Store(store),
            dtype,
            device: device.clone(),
            gguf: GgufWeights::Dequantized,
            loras: Vec::new(),
        }
    }

    /// The tensor as stored, on the model's device.
    pub(super) fn get_stored(&mut self, name: &str) -> Result<Tensor> {
        let t = match &mut self.source {
            WeightSource::Store(store) => store.take(name)?,
            WeightSource::Map(map) => map.remove(name),
        };
        let t = t.ok_or_else(|| Error::Shape(format!("Flux weight `{name}` was not prepared")))?;
        Ok(t.to_device(&self.device)?)
    }

    /// The tensor in the model dtype (fp8 stays fp8: each layer upcasts it
    /// when it runs), or what a LoRA puts in its place (a QK-norm scale).
    pub(super) fn get(&mut self, name: &str) -> Result<Tensor> {
        let t = self.get_stored(name)?;
        if let Some(r) = lora::replacement(&self.loras, name) {
            return Ok(r.to_device(&self.device)?.to_dtype(self.dtype)?);
        }
        Ok(if t.dtype() == DType::F8E4M3 { t } else { t.to_dtype(self.dtype)? })
    }

    /// A linear layer with the LoRAs' change to it: merged into a weight
    /// held in the model dtype; kept beside one held fp8 or quantized. A
    /// LoRA that widens the layer's input (`img_in` for FLUX.1 Canny/Depth)
    /// makes it dense, its new columns zero before the change is added. The
    /// LoRAs' bias changes are added to the bias in f32.
    pub(super) fn linear(&mut self, prefix: &str) -> Result<Linear> {
        let weight = format!("{prefix}.weight");
        let bias = self.get_stored(&format!("{prefix}.bias"))?;
        let bias = match lora::bias_delta(&self.loras, &format!("{prefix}.bias"), &self.device)? {
            Some(d) => (bias.to_dtype(DType::F32)? + d)?.to_dtype(self.dtype)?,
            None => bias.to_dtype(self.dtype)?,
        };
        let bias = Some(bias);
        let delta = lora::low_rank(&self.loras, &weight, &self.device)?;
        if let Some(wide) = delta.as_ref().filter(|d| d.in_dim() > self.stored_in_dim(&weight)) {
            let w = self.get_stored(&weight)?.to_dtype(DType::F32)?;
            let (out, in_dim) = w.dims2()?;
            let zeros = Tensor::zeros((out, wide.in_dim() - in_dim), DType::F32, w.device())?;
            return Linear::from_parts(wide.merged(&Tensor::cat(&[&w, &zeros], 1)?, self.dtype)?, bias);
        }
        if let (GgufWeights::Quantized, WeightSource::Store(store)) = (self.gguf, &mut self.source) {
            if let Some(blocks) = store.take_quantized(&weight, &self.device)? {
                let lin = Linear::quantized(blocks, bias, self.dtype)?;
                return match delta {
                    Some(d) => lin.with_delta(d, self.dtype),
                    None => Ok(lin),
                };
            }
        }
        let Some(delta) = delta else { return Linear::from_parts(self.get(&weight)?, bias) };
        let w = self.get_stored(&weight)?;
        if w.dtype() == DType::F8E4M3 {
            Linear::from_parts(w, bias)?.with_delta(delta, self.dtype)
        } else {
            Linear::from_parts(delta.merged(&w, self.dtype)?, bias)
        }
    }
}

impl Weights {
    /// Columns of stored weight `name` `[out, in]` (0 if unknown).
    fn stored_in_dim(&self, name: &str) -> usize {
        let shape = match &self.source {
            WeightSource::Store(store) => store.shape(name),
            WeightSource::Map(map) => map.get(name).map(|t| t.dims()),
        };
        shape.and_then(|s| s.get(1).copied()).unwrap_or(0)
    }
}

impl Linear {
    /// Puts `{p}.weight` and `{p}.bias` (Flux's linears all have one) into `out`.
    fn put(&self, p: &str, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        out.insert(format!("{p}.weight"), self.weight()?);
        let bias = self.bias().ok_or_else(|| Error::Shape(format!("Flux linear `{p}` has no bias")))?;
        out.insert(format!("{p}.bias"), bias.clone());
        Ok(())
    }
}

/// Every canonical (BFL) tensor of a model with this config, with its shape.
pub fn canonical_tensors(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: String, out: usize, inp: usize| {
        v.push((format!("{name}.weight"), vec![out, inp]));
        v.push((format!("{name}.bias"), vec![out]));
    };
    lin("img_in".into(), h, cfg.in_channels);
    lin("time_in.in_layer".into(), h, TIME_EMBED_DIM);
    lin("time_in.out_layer".into(), h, h);
    lin("vector_in.in_layer".into(), h, cfg.vec_in_dim);
    lin("vector_in.out_layer".into(), h, h);
    if cfg.guidance_embed {
        lin("guidance_in.in_layer".into(), h, TIME_EMBED_DIM);
        lin("guidance_in.out_layer".into(), h, h);
    }
    lin("txt_in".into(), h, cfg.context_in_dim);
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            lin(format!("{p}_mod.lin"), 6 * h, h);
            lin(format!("{p}_attn.qkv"), 3 * h, h);
            lin(format!("{p}_attn.proj"), h, h);
            lin(format!("{p}_mlp.0"), cfg.mlp_hidden, h);
            lin(format!("{p}_mlp.2"), h, cfg.mlp_hidden);
        }
    }
    for i in 0..cfg.depth_single {
        let p = format!("single_blocks.{i}");
        lin(format!("{p}.linear1"), 3 * h + cfg.mlp_hidden, h);
        lin(format!("{p}.linear2"), h, h + cfg.mlp_hidden);
        lin(format!("{p}.modulation.lin"), 3 * h, h);
    }
    // A ControlNet's blocks (`out_channels` 0) have no final layer.
    if cfg.out_channels > 0 {
        lin("final_layer.adaLN_modulation.1".into(), 2 * h, h);
        lin("final_layer.linear".into(), cfg.out_channels, h);
    }
    let d = cfg.head_dim();
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query", "key"] {
                v.push((format!("double_blocks.{i}.{s}_attn.norm.{n}_norm.scale"), vec![d]));
            }
        }
    }
    for i in 0..cfg.depth_single {
        for n in ["query", "key"] {
            v.push((format!("single_blocks.{i}.norm.{n}_norm.scale"), vec![d]));
        }
    }
    v
}

fn no_block(block: BlockId) -> Error {
    Error::Shape(format!("{block} is not a block of this model"))
}

/// `in_layer → SiLU → out_layer` (BFL's `MLPEmbedder`).
#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self { in_layer: w.linear(&format!("{p}.in_layer"))?, out_layer: w.linear(&format!("{p}.out_layer"))? })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// RMSNorm over the head size with a learned scale (BFL's `QKNorm`).
#[derive(Debug, Clone)]
struct QkNorm {
    query_norm: Tensor,
    key_norm: Tensor,
}

impl QkNorm {
    fn new(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            query_norm: w.get(&format!("{p}.query_norm.scale"))?,
            key_norm: w.get(&format!("{p}.key_norm.scale"))?,
        })
    }

    fn put(&self, p: &str, out: &mut BTreeMap<String, Tensor>) {
        out.insert(format!("{p}.query_norm.scale"), self.query_norm.clone());
        out.insert(format!("{p}.key_norm.scale"), self.key_norm.clone());
    }

    fn forward(&self, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
        let norm = |x: &Tensor, scale: &Tensor| -> Result<Tensor> { rms_norm_scaled(x, scale, QK_NORM_EPS) };
        Ok((norm(q, &self.query_norm)?, norm(k, &self.key_norm)?))
    }
}

/// Shift, scale and gate of one modulated sub-layer, each `[B, 1, hidden]`.
#[derive(Debug, Clone)]
struct Mod {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

/// `lin(SiLU(vec))` cut into `n` groups of (shift, scale, gate), from
/// `silu_vec` = SiLU(vec) (computed once a call, not once a block).
fn modulation(lin: &Linear, silu_vec: &Tensor, n: usize) -> Result<Vec<Mod>> {
    let out = lin.forward(silu_vec)?.unsqueeze(1)?;
    let chunks = out.chunk(3 * n, D::Minus1)?;
    Ok(chunks.chunks(3).map(|c| Mod { shift: c[0].clone(), scale: c[1].clone(), gate: c[2].clone() }).collect())
}

/// `[B, L, 3·H·D]` → three `[B, H, L, D]`.
fn split_qkv(qkv: &Tensor, heads: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, n) = qkv.dims3()?;
    let d = n / (3 * heads);
    let qkv = qkv.reshape((b, l, 3, heads, d))?;
    let part = |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2)?.contiguous()?) };
    Ok((part(0)?, part(1)?, part(2)?))
}

/// RoPE tables for every token: the angle of each consecutive pair of a
/// head, `[L, D/2]`, as cos and sin in f32, and in the model's dtype for
/// candle's fused GPU kernel (converted once per table, not per block).
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    cos_dt: Tensor,
    sin_dt: Tensor,
}

impl Rope {
    /// From token positions `ids [L, axes]` (text tokens first, as the model sees them).
    /// Angles in f64 as BFL's `rope`, then f32.
    pub fn new(ids: &[[f32; 3]], axes_dim: &[usize], theta: f64, dtype: DType, device: &Device) -> Result<Self> {
        let half: usize = axes_dim.iter().sum::<usize>() / 2;
        // ω_j = θ^(−2j/dim) per axis, computed once.
        let omegas: Vec<Vec<f64>> = axes_dim
            .iter()
            .map(|&dim| (0..dim / 2).map(|j| 1.0 / theta.powf((2 * j) as f64 / dim as f64)).collect())
            .collect();
        let mut cos = Vec::with_capacity(ids.len() * half);
        let mut sin = Vec::with_capacity(ids.len() * half);
        for pos in ids {
            for (axis, omega) in omegas.iter().enumerate() {
                let p = f64::from(pos.get(axis).copied().unwrap_or(0.0));
                for w in omega {
                    let a = p * w;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        let n = ids.len();
        let cos = Tensor::from_vec(cos, (n, half), device)?;
        let sin = Tensor::from_vec(sin, (n, half), device)?;
        let (cos_dt, sin_dt) =
            if device.is_cpu() { (cos.clone(), sin.clone()) } else { (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?) };
        Ok(Self { cos, sin, cos_dt, sin_dt })
    }

    /// Rotates consecutive pairs of `x [B, H, L, D]`: (a, b) → (a·cos − b·sin, a·sin + b·cos).
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, l, d) = x.dims4()?;
        let dtype = x.dtype();
        if !x.device().is_cpu() {
            // candle's fused kernel for consecutive pairs (one pass; in the input dtype).
            let (c, s) = if self.cos_dt.dtype() == dtype {
                (self.cos_dt.clone(), self.sin_dt.clone())
            } else {
                (self.cos.to_dtype(dtype)?, self.sin.to_dtype(dtype)?)
            };
            return Ok(candle_nn::rotary_emb::rope_i(&x.contiguous()?, &c, &s)?);
        }
        let (cos, sin) = (self.cos.unsqueeze(2)?, self.sin.unsqueeze(2)?);
        let x = x.to_dtype(DType::F32)?.reshape((b, h, l, d / 2, 2))?;
        let x0 = x.narrow(4, 0, 1)?;
        let x1 = x.narrow(4, 1, 1)?;
        let o0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let o1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Ok(Tensor::cat(&[o0, o1], 4)?.reshape((b, h, l, d))?.to_dtype(dtype)?)
    }
}

/// A block's attention, heads merged (`[B, L, H·D]`), split at `row0`: rows
/// before it as attention left them, rows from it (contiguous) with the
/// hooks applied (the double blocks' image tokens; single blocks pass 0).
/// The hooks' effect is computed in the attention's own launch where it is
/// one attention term ([`Hooks::single_term`]: one IP-Adapter image) and the
/// fused kernel takes it; otherwise the attention runs, then the hooks.
fn attention_with_hooks(qkv: &QkvOut, ctx: &Ctx, point: &HookPoint, row0: usize) -> Result<(Tensor, Tensor)> {
    let l = qkv.q.dim(2)?;
    let split = |attn: Tensor| -> Result<(Tensor, Tensor)> {
        Ok((attn.narrow(1, 0, row0)?, attn.narrow(1, row0, l - row0)?.contiguous()?))
    };
    let Some(q_pre) = &qkv.q_pre_rope else {
        return split(ctx.attention.sdpa_merged(&qkv.q, &qkv.k, &qkv.v)?);
    };
    // Asking the hooks for their term costs K/V work, so only where a kernel may take it.
    if ctx.attention.takes_extra() {
        if let Some(term) = ctx.hooks.single_term(point, q_pre)? {
            let extra = ExtraAttention { q: q_pre, k: &term.k, v: &term.v, row0, scale: term.scale };
            if let Some(attn) = ctx.attention.sdpa_merged_extra(&qkv.q, &qkv.k, &qkv.v, &extra) {
                return split(attn?);
            }
        }
    }
    let (head, tail) = split(ctx.attention.sdpa_merged(&qkv.q, &qkv.k, &qkv.v)?)?;
    let tail = ctx.hooks.apply(point, &q_pre.narrow(2, row0, l - row0)?, tail)?;
    Ok((head, tail))
}

/// Token positions and their RoPE tables.
type RopeEntry = (Vec<[f32; 3]>, Arc<Rope>);

/// One stream's QKV projection without its bias, with what turns it into
/// attention inputs.
struct QkvPart<'a> {
    qkv: Tensor,
    bias: Option<&'a Tensor>,
    norm: &'a QkNorm,
}

/// Normed and rotated q, k and v `[B, H, L, D]` of `parts`, their tokens
/// concatenated in order, and q before RoPE when hooks want it: one fused
/// kernel where `ctx.fused` takes it, else bias, split, norm, concatenation
/// and RoPE as separate ops.
fn qkv_rope(parts: &[QkvPart<'_>], ctx: &Ctx, heads: usize) -> Result<QkvOut> {
    let keep_q = !ctx.hooks.is_empty();
    let inputs: Vec<QkvInput<'_>> = parts
        .iter()
        .map(|p| QkvInput { qkv: &p.qkv, bias: p.bias, q_scale: &p.norm.query_norm, k_scale: &p.norm.key_norm })
        .collect();
    let streams =
        QkvStreams { streams: &inputs, heads, eps: QK_NORM_EPS, cos: &ctx.rope.cos, sin: &ctx.rope.sin, keep_q };
    if let Some(out) = ctx.fused.and_then(|f| f.qkv_rope(&streams)) {
        return out;
    }
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for p in parts {
        let (q, k, v) = split_qkv(&add_bias(&p.qkv, p.bias)?, heads)?;
        let (q, k) = p.norm.forward(&q, &k)?;
        qs.push(q);
        ks.push(k);
        vs.push(v);
    }
    let cat = |xs: &[Tensor]| -> Result<Tensor> { Ok(if let [x] = xs { x.clone() } else { Tensor::cat(xs, 2)? }) };
    let (q, k, v) = (cat(&qs)?, cat(&ks)?, cat(&vs)?);
    let q_pre_rope = keep_q.then(|| q.clone());
    Ok(QkvOut { q: ctx.rope.apply(&q)?, k: ctx.rope.apply(&k)?, v, q_pre_rope })
}

/// One stream (image or text) of a double block.
#[derive(Debug, Clone)]
struct Stream {
    modulation: Linear,
    qkv: Linear,
    norm: QkNorm,
    proj: Linear,
    mlp_0: Linear,
    mlp_2: Linear,
}

impl Stream {
    fn new(w: &mut Weights, p: &str) -> Result<Self> {
        Ok(Self {
            modulation: w.linear(&format!("{p}_mod.lin"))?,
            qkv: w.linear(&format!("{p}_attn.qkv"))?,
            norm: QkNorm::new(w, &format!("{p}_attn.norm"))?,
            proj: w.linear(&format!("{p}_attn.proj"))?,
            mlp_0: w.linear(&format!("{p}_mlp.0"))?,
            mlp_2: w.linear(&format!("{p}_mlp.2"))?,
        })
    }

    /// Its tensors by canonical name (`p` as in [`Self::new`]).
    fn tensors(&self, p: &str, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        self.modulation.put(&format!("{p}_mod.lin"), out)?;
        self.qkv.put(&format!("{p}_attn.qkv"), out)?;
        self.norm.put(&format!("{p}_attn.norm"), out);
        self.proj.put(&format!("{p}_attn.proj"), out)?;
        self.mlp_0.put(&format!("{p}_mlp.0"), out)?;
        self.mlp_2.put(&format!("{p}_mlp.2"), out)
    }

    /// Modulation and QKV projection (bias not yet added) of this stream.
    fn qkv<'s>(&'s self, x: &Tensor, ctx: &Ctx) -> Result<(Vec<Mod>, QkvPart<'s>)> {
        let mods = modulation(&self.modulation, ctx.silu_vec, 2)?;
        let qkv = self.qkv.forward_no_bias(&ctx.modulate(x, &mods[0])?)?;
        Ok((mods, QkvPart { qkv, bias: self.qkv.bias(), norm: &self.norm }))
    }

    /// Residual updates after attention (each bias added by the op that follows its matmul).
    fn finish(&self, x: &Tensor, attn: &Tensor, mods: &[Mod], ctx: &Ctx) -> Result<Tensor> {
        let x = ctx.gated_add(x, &self.proj.forward_no_bias(attn)?, self.proj.bias(), &mods[0].gate)?;
        let mlp = linear_gelu(ctx.fused, &self.mlp_0, &ctx.modulate(&x, &mods[1])?)?;
        let mlp = self.mlp_2.forward_no_bias(&mlp)?;
        ctx.gated_add(&x, &mlp, self.mlp_2.bias(), &mods[1].gate)
    }
}

/// A double-stream block: text and image keep separate weights and attend jointly.
#[derive(Debug, Clone)]
pub struct DoubleBlock {
    img: Stream,
    txt: Stream,
}

/// A single-stream block over the concatenated text and image tokens.
#[derive(Debug, Clone)]
pub struct SingleBlock {
    linear1: Linear,
    linear2: Linear,
    norm: QkNorm,
    modulation: Linear,
}

impl DoubleBlock {
    fn new(w: &mut Weights, i: usize) -> Result<Self> {
        let p = format!("double_blocks.{i}");
        Ok(Self { img: Stream::new(w, &format!("{p}.img"))?, txt: Stream::new(w, &format!("{p}.txt"))? })
    }

    fn tensors(&self, i: usize, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let p = format!("double_blocks.{i}");
        self.img.tensors(&format!("{p}.img"), out)?;
        self.txt.tensors(&format!("{p}.txt"), out)
    }
}

impl SingleBlock {
    fn new(w: &mut Weights, i: usize) -> Result<Self> {
        let p = format!("single_blocks.{i}");
        Ok(Self {
            linear1: w.linear(&format!("{p}.linear1"))?,
            linear2: w.linear(&format!("{p}.linear2"))?,
            norm: QkNorm::new(w, &format!("{p}.norm"))?,
            modulation: w.linear(&format!("{p}.modulation.lin"))?,
        })
    }

    fn tensors(&self, i: usize, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        let p = format!("single_blocks.{i}");
        self.linear1.put(&format!("{p}.linear1"), out)?;
        self.linear2.put(&format!("{p}.linear2"), out)?;
        self.norm.put(&format!("{p}.norm"), out);
        self.modulation.put(&format!("{p}.modulation.lin"), out)
    }
}

/// A block held by the model, or streamed from its [`BlockSource`] per use.
#[derive(Debug, Clone)]
enum Slot<B> {
    Resident(B),
    Streamed,
}

/// What one model call needs besides the image tokens.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// T5 tokens `[B, L_txt, context_in_dim]`.
    pub txt: Tensor,
    /// Pooled CLIP vector `[B, vec_in_dim]`.
    pub y: Tensor,
    /// Distilled guidance (dev only; ignored by schnell).
    pub guidance: Option<f32>,
}

/// Per-call state shared by every block.
struct Ctx<'a> {
    /// SiLU of the conditioning vector, the input of every block's modulation.
    silu_vec: &'a Tensor,
    rope: &'a Rope,
    attention: &'a Attention,
    ln: &'a LayerNorm,
    fused: Option<&'a dyn FusedModulation>,
    hooks: Hooks<'a>,
    point: HookPoint,
}

impl Ctx<'_> {
    /// `LN(x) · (1 + scale) + shift` of a modulated sub-layer.
    fn modulate(&self, x: &Tensor, m: &Mod) -> Result<Tensor> {
        modulate(self.fused, self.ln, x, &m.scale, &m.shift)
    }

    /// `x + (y + bias) · gate`: a gated residual.
    fn gated_add(&self, x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: &Tensor) -> Result<Tensor> {
        gated_add(self.fused, x, y, bias, gate)
    }
}

/// A Flux transformer with its weights on one device.
#[derive(Debug, Clone)]
pub struct FluxModel {
    pub cfg: FluxConfig,
    pub dtype: DType,
    img_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    txt_in: Linear,
    double_blocks: Vec<Slot<DoubleBlock>>,
    single_blocks: Vec<Slot<SingleBlock>>,
    /// Where streamed blocks come from; `None` while every block is resident.
    source: Option<Arc<dyn BlockSource>>,
    /// `final_layer`'s modulation and projection; `None` for a ControlNet's
    /// blocks, whose per-block image streams are their output instead
    /// ([`super::controlnet`]).
    final_layer: Option<(Linear, Linear)>,
    ln: LayerNorm,
    attention: Attention,
    /// Fused LayerNorm + modulation and gated residuals where they apply.
    fused: Option<Arc<dyn FusedModulation>>,
    /// The RoPE tables of the last call's token positions (a sampler's
    /// steps all use the same ones), shared by clones of this model.
    rope_cache: Arc<Mutex<Option<RopeEntry>>>,
    device: Device,
}

/// BFL's `timestep_embedding`: `[cos(t·f), sin(t·f)]`, `f_j = 10000^(−j/half)`, t scaled by 1000, in f32.
/// `t` is first rounded to the model dtype, as both references pass it in that dtype.
pub fn timestep_embedding(t: &[f32], dtype: DType, device: &Device) -> Result<Tensor> {
    let half = TIME_EMBED_DIM / 2;
    let t = Tensor::new(t, device)?.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let log_period = (10_000f32).ln();
    let freqs: Vec<f32> = (0..half).map(|j| ((-log_period * j as f32) / half as f32).exp()).collect();
    let mut out = Vec::with_capacity(t.len() * TIME_EMBED_DIM);
    for ti in &t {
        let ti = ti * TIME_FACTOR;
        out.extend(freqs.iter().map(|f| (ti * f).cos()));
        out.extend(freqs.iter().map(|f| (ti * f).sin()));
    }
    Ok(Tensor::from_vec(out, (t.len(), TIME_EMBED_DIM), device)?.to_dtype(dtype)?)
}

impl FluxModel {
    /// Loads either layout (see [`FluxLayout`]): infers the sizes, validates
    /// every tensor, rearranges to BFL's layout, converts to `dtype` (fp8 kept).
    /// `axes_dim` is needed only for head sizes other than FLUX.1's 128.
    pub fn from_store(store: TensorStore, axes_dim: Option<Vec<usize>>, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self::from_store_streamed(store, axes_dim, dtype, device, &[])?.0)
    }

    /// As [`Self::from_store`], but the tensors of `streamed` blocks never
    /// reach `device`: they are returned (canonical names, converted to
    /// `dtype` where they stay, normally host memory; fp8 kept) for the
    /// caller's [`BlockSource`], and the model runs once it has one.
    /// A GGUF file's quantized weights are dequantized as they load
    /// ([`GgufWeights::Dequantized`]; [`Self::from_store_with`] chooses).
    pub fn from_store_streamed(
        store: TensorStore,
        axes_dim: Option<Vec<usize>>,
        dtype: DType,
        device: &Device,
        streamed: &[BlockId],
    ) -> Result<(Self, BTreeMap<String, Tensor>)> {
        let load = FluxLoad { dtype, device, streamed, gguf: GgufWeights::Dequantized, loras: &[] };
        Self::from_store_with(store, axes_dim, &load)
    }

    /// [`Self::from_store_streamed`] with every choice in `load`. Streamed
    /// blocks' tensors are returned dequantized whatever `load.gguf` says.
    pub fn from_store_with(
        store: TensorStore,
        axes_dim: Option<Vec<usize>>,
        load: &FluxLoad<'_>,
    ) -> Result<(Self, BTreeMap<String, Tensor>)> {
        let (layout, store) = FluxLayout::detect(store)?;
        let cfg = layout.infer(&store)?.with_axes(axes_dim)?;
        let canonical = layout.canonicalize(store, &canonical_tensors(&cfg), cfg.hidden_size, cfg.mlp_hidden)?;
        // A FLUX.1 Canny/Depth LoRA widens the input (validated above at the file's width).
        let cfg = FluxConfig { in_channels: lora::input_channels(load.loras, cfg.in_channels), ..cfg };
        tracing::debug!(target: "ipaflux::flux", ?layout, depth = cfg.depth, single = cfg.depth_single,
            in_channels = cfg.in_channels, "loaded Flux");
        Self::from_canonical_store(cfg, canonical, load)
    }

    /// Builds from canonical tensors (already validated against `cfg`).
    pub fn from_canonical(
        cfg: FluxConfig,
        map: BTreeMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Ok(Self::from_canonical_streamed(cfg, map, dtype, device, &[])?.0)
    }

    /// As [`Self::from_canonical`], with `streamed` blocks left where their
    /// tensors are (see [`Self::from_store_streamed`]).
    pub fn from_canonical_streamed(
        cfg: FluxConfig,
        map: BTreeMap<String, Tensor>,
        dtype: DType,
        device: &Device,
        streamed: &[BlockId],
    ) -> Result<(Self, BTreeMap<String, Tensor>)> {
        let load = FluxLoad { dtype, device, streamed, gguf: GgufWeights::Dequantized, loras: &[] };
        Self::from_canonical_store(cfg, TensorStore::from_tensors("canonical Flux tensors", map), &load)
    }

    /// [`Self::from_canonical_streamed`] over a store: each tensor is read as
    /// the model takes it and moved to `device` before the next is read.
    pub(super) fn from_canonical_store(
        cfg: FluxConfig,
        mut store: TensorStore,
        load: &FluxLoad<'_>,
    ) -> Result<(Self, BTreeMap<String, Tensor>)> {
        let FluxLoad { dtype, device, streamed, gguf, loras } = *load;
        cfg.check()?;
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(Error::Unsupported(format!("Flux compute dtype must be f32, bf16 or f16, not {dtype:?}")));
        }
        let all = BlockId::all(&cfg);
        if let Some(b) = streamed.iter().find(|b| !all.contains(b)) {
            return Err(no_block(*b));
        }
        let names: Vec<String> =
            store.names().filter(|n| streamed.iter().any(|b| b.owns(n))).map(str::to_string).collect();
        let mut kept = BTreeMap::new();
        for name in names {
            if let Some(t) = store.take(&name)? {
                // The LoRAs' changes are merged once here: a streamed block arrives dense.
                let t = if let Some(r) = lora::replacement(loras, &name) {
                    r.to_dtype(dtype)?
                } else if let Some(delta) = lora::low_rank(loras, &name, t.device())? {
                    delta.merged(&t, dtype)?
                } else if let Some(d) = lora::bias_delta(loras, &name, t.device())? {
                    (t.to_dtype(DType::F32)? + d)?.to_dtype(dtype)?
                } else if t.dtype() == DType::F8E4M3 {
                    t
                } else {
                    t.to_dtype(dtype)?
                };
                kept.insert(name, t);
            }
        }
        let mut w =
            Weights { source: WeightSource::Store(store), dtype, device: device.clone(), gguf, loras: loras.to_vec() };
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                Ok(if streamed.contains(&BlockId::Double(i)) {
                    Slot::Streamed
                } else {
                    Slot::Resident(DoubleBlock::new(&mut w, i)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single)
            .map(|i| {
                Ok(if streamed.contains(&BlockId::Single(i)) {
                    Slot::Streamed
                } else {
                    Slot::Resident(SingleBlock::new(&mut w, i)?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            img_in: w.linear("img_in")?,
            time_in: MlpEmbedder::new(&mut w, "time_in")?,
            vector_in: MlpEmbedder::new(&mut w, "vector_in")?,
            guidance_in: if cfg.guidance_embed { Some(MlpEmbedder::new(&mut w, "guidance_in")?) } else { None },
            txt_in: w.linear("txt_in")?,
            double_blocks,
            single_blocks,
            source: None,
            final_layer: if cfg.out_channels > 0 {
                Some((w.linear("final_layer.adaLN_modulation.1")?, w.linear("final_layer.linear")?))
            } else {
                None
            },
            ln: LayerNorm::no_affine(cfg.hidden_size, LN_EPS, device)?,
            attention: Attention::reference(),
            fused: None,
            rope_cache: Arc::default(),
            device: device.clone(),
            dtype,
            cfg,
        };
        Ok((model, kept))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Uses `attention` (e.g. a fused CUDA kernel) in every block from now on.
    pub fn set_attention(&mut self, attention: Attention) {
        self.attention = attention;
    }

    /// Uses `kernels` for LayerNorm + modulation and the gated residuals
    /// wherever they take the inputs (`None`: the reference ops everywhere).
    pub fn set_fused_modulation(&mut self, kernels: Option<Arc<dyn FusedModulation>>) {
        self.fused = kernels;
    }

    /// Takes `blocks` out of the model and returns their tensors by canonical
    /// name (on the model's device; the caller moves them where it keeps
    /// streamed weights, and the model's device memory is freed once they
    /// are dropped). The model runs again once it has a [`BlockSource`]
    /// holding them ([`Self::set_block_source`]). Already streamed blocks are
    /// skipped.
    pub fn stream_blocks(&mut self, blocks: &[BlockId]) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for &block in blocks {
            match block {
                BlockId::Double(i) => {
                    let slot = self.double_blocks.get_mut(i).ok_or_else(|| no_block(block))?;
                    if let Slot::Resident(b) = std::mem::replace(slot, Slot::Streamed) {
                        b.tensors(i, &mut out)?;
                    }
                }
                BlockId::Single(i) => {
                    let slot = self.single_blocks.get_mut(i).ok_or_else(|| no_block(block))?;
                    if let Slot::Resident(b) = std::mem::replace(slot, Slot::Streamed) {
                        b.tensors(i, &mut out)?;
                    }
                }
            }
        }
        tracing::debug!(target: "ipaflux::flux", blocks = blocks.len(), tensors = out.len(), "blocks taken out for streaming");
        Ok(out)
    }

    /// The source of the streamed blocks' tensors.
    pub fn set_block_source(&mut self, source: Arc<dyn BlockSource>) {
        self.source = Some(source);
    }

    /// The blocks not resident, in execution order.
    pub fn streamed_blocks(&self) -> Vec<BlockId> {
        let doubles = self.double_blocks.iter().enumerate().filter(|(_, s)| matches!(s, Slot::Streamed));
        let singles = self.single_blocks.iter().enumerate().filter(|(_, s)| matches!(s, Slot::Streamed));
        doubles.map(|(i, _)| BlockId::Double(i)).chain(singles.map(|(i, _)| BlockId::Single(i))).collect()
    }

    /// A streamed block's tensors from the source, after announcing the
    /// streamed block that follows it so its copy overlaps this block's work.
    fn fetch_streamed(&self, block: BlockId, next: Option<BlockId>) -> Result<Weights> {
        let source = self.source.as_ref().ok_or_else(|| {
            Error::Registry(format!("{block} is streamed but the model has no block source (set_block_source)"))
        })?;
        let map = source.fetch(block)?;
        if let Some(next) = next {
            source.prefetch(next)?;
        }
        Ok(Weights {
            source: WeightSource::Map(map),
            dtype: self.dtype,
            device: self.device.clone(),
            gguf: GgufWeights::Dequantized,
            loras: Vec::new(),
        })
    }

    /// The double blocks on `img` and `txt`, then the single blocks on their
    /// concatenation. Streamed blocks: the first is prefetched now, each later
    /// one while its predecessor runs.
    /// `after` sees the image stream after each block and may replace it
    /// (a ControlNet's residual added, or its features kept).
    fn run_blocks(&self, img: Tensor, txt: Tensor, ctx: &Ctx, after: AfterBlock<'_>) -> Result<Tensor> {
        let streamed = self.streamed_blocks();
        if let (Some(first), Some(source)) = (streamed.first(), &self.source) {
            source.prefetch(*first)?;
        }
        let mut upcoming = streamed.iter().copied().skip(1);
        let (mut img, mut txt) = (img, txt);
        for (index, slot) in self.double_blocks.iter().enumerate() {
            (img, txt) = match slot {
                Slot::Resident(block) => block.forward(&img, &txt, ctx, index, self.cfg.num_heads)?,
                Slot::Streamed => {
                    let mut w = self.fetch_streamed(BlockId::Double(index), upcoming.next())?;
                    DoubleBlock::new(&mut w, index)?.forward(&img, &txt, ctx, index, self.cfg.num_heads)?
                }
            };
            if let Some(next) = after(Site::Double { index }, &img)? {
                img = next;
            }
        }
        let l_txt = txt.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for (index, slot) in self.single_blocks.iter().enumerate() {
            x = match slot {
                Slot::Resident(block) => block.forward(&x, ctx, index, &self.cfg)?,
                Slot::Streamed => {
                    let mut w = self.fetch_streamed(BlockId::Single(index), upcoming.next())?;
                    SingleBlock::new(&mut w, index)?.forward(&x, ctx, index, &self.cfg)?
                }
            };
            let img = x.narrow(1, l_txt, x.dim(1)? - l_txt)?;
            if let Some(next) = after(Site::Single { index }, &img)? {
                x = Tensor::cat(&[&x.narrow(1, 0, l_txt)?, &next], 1)?;
            }
        }
        Ok(x)
    }

    /// RoPE tables for `ids`, from the cache when the last call had the same positions.
    fn rope(&self, ids: Vec<[f32; 3]>) -> Result<Arc<Rope>> {
        let mut cache = self.rope_cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached, rope)) = cache.as_ref() {
            if *cached == ids {
                return Ok(rope.clone());
            }
        }
        let rope = Arc::new(Rope::new(&ids, &self.cfg.axes_dim, self.cfg.theta, self.dtype, &self.device)?);
        *cache = Some((ids, rope.clone()));
        Ok(rope)
    }

    /// Predicts the flow velocity for packed latents `img [B, L_img, in_channels]`
    /// at positions `img_ids` (`[row, col]` per token; text positions are 0) and
    /// timestep `sigma`. `step` numbers the sampler step for the hooks.
    pub fn forward(
        &self,
        img: &Tensor,
        img_ids: &[[f32; 3]],
        cond: &Conditioning,
        sigma: f64,
        step: usize,
        hooks: Hooks<'_>,
    ) -> Result<Tensor> {
        self.forward_controlled(img, img_ids, cond, sigma, step, hooks, &[])
    }

    /// [`Self::forward`] with ControlNets' residuals added to the image stream
    /// after the blocks they feed (diffusers' `controlnet_block_samples` and
    /// `controlnet_single_block_samples`; several nets' add up).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_controlled(
        &self,
        img: &Tensor,
        img_ids: &[[f32; 3]],
        cond: &Conditioning,
        sigma: f64,
        step: usize,
        hooks: Hooks<'_>,
        control: &[ControlResiduals],
    ) -> Result<Tensor> {
        let (final_mod, final_linear) = self.final_layer.as_ref().ok_or_else(|| {
            Error::Unsupported(
                "this model is a ControlNet's blocks (no final layer): it gives features, not a velocity".into(),
            )
        })?;
        let l_img = img.dim(1)?;
        let emb = self.embed(img, cond, sigma)?;
        let (depth, depth_single) = (self.cfg.depth, self.cfg.depth_single);
        let mut add = |site: Site, img: &Tensor| -> Result<Option<Tensor>> {
            let mut out: Option<Tensor> = None;
            for residuals in control {
                if let Some(r) = residuals.at(site, depth, depth_single)? {
                    let base = out.as_ref().unwrap_or(img);
                    if r.dims() != base.dims() {
                        return Err(Error::Shape(format!(
                            "a ControlNet residual {:?} for an image stream of {:?} at {site:?}",
                            r.dims(),
                            base.dims()
                        )));
                    }
                    out = Some((base + r.to_dtype(base.dtype())?)?);
                }
            }
            Ok(out)
        };
        let (x, silu_vec) = self.run(emb, img_ids, sigma, step, hooks, &mut add)?;
        let l_txt = x.dim(1)? - l_img;
        let img = x.narrow(1, l_txt, l_img)?;
        let m = final_mod.forward(&silu_vec)?.unsqueeze(1)?.chunk(2, D::Minus1)?;
        let img = modulate(self.fused.as_deref(), &self.ln, &img.contiguous()?, &m[1], &m[0])?;
        final_linear.forward(&img)
    }

    /// The inputs of the first block: `img_in`, `txt_in`, and the conditioning
    /// vector from the timestep, guidance and pooled text.
    pub(super) fn embed(&self, img: &Tensor, cond: &Conditioning, sigma: f64) -> Result<Embedded> {
        let (b, _, c) = img.dims3()?;
        if c != self.cfg.in_channels {
            return Err(Error::Shape(format!(
                "latents {:?} for a model of {} input channels",
                img.dims(),
                self.cfg.in_channels
            )));
        }
        let dt = self.dtype;
        let img = self.img_in.forward(&img.to_dtype(dt)?)?;
        let mut vec = self.time_in.forward(&timestep_embedding(&vec![sigma as f32; b], dt, &self.device)?)?;
        if let Some(g_in) = &self.guidance_in {
            let g = cond.guidance.ok_or_else(|| {
                Error::Unsupported("this Flux model has a guidance embedding (dev): give a guidance value".into())
            })?;
            vec = (vec + g_in.forward(&timestep_embedding(&vec![g; b], dt, &self.device)?)?)?;
        }
        let vec = (vec + self.vector_in.forward(&cond.y.to_dtype(dt)?)?)?;
        let txt = self.txt_in.forward(&cond.txt.to_dtype(dt)?)?;
        Ok(Embedded { img, txt, vec })
    }

    /// Every block on `emb` (text positions 0, image tokens at `img_ids`):
    /// the last block's tokens (text first) and SiLU of the conditioning vector.
    pub(super) fn run(
        &self,
        emb: Embedded,
        img_ids: &[[f32; 3]],
        sigma: f64,
        step: usize,
        hooks: Hooks<'_>,
        after: AfterBlock<'_>,
    ) -> Result<(Tensor, Tensor)> {
        let Embedded { img, txt, vec } = emb;
        let (l_txt, l_img) = (txt.dim(1)?, img.dim(1)?);
        if img_ids.len() != l_img {
            return Err(Error::Shape(format!("{} image tokens with {} positions", l_img, img_ids.len())));
        }
        let ids: Vec<[f32; 3]> = std::iter::repeat_n([0.0; 3], l_txt).chain(img_ids.iter().copied()).collect();
        let rope = self.rope(ids)?;
        let point = HookPoint { site: Site::Double { index: 0 }, depth: self.cfg.depth, sigma, step, txt_len: l_txt };
        let fused = self.fused.as_deref();
        let silu_vec = vec.silu()?;
        let ctx =
            Ctx { silu_vec: &silu_vec, rope: &rope, attention: &self.attention, ln: &self.ln, fused, hooks, point };

        let blocks = self.run_blocks(img, txt, &ctx, after);
        if let (Err(_), Some(source)) = (&blocks, &self.source) {
            // A block failed: blocks prefetched for the rest of this call would hold memory until the next.
            source.discard_prefetched();
        }
        Ok((blocks?, silu_vec))
    }
}

/// What [`FluxModel::run`] calls after each block with the image stream
/// (double blocks: theirs; single blocks: the image tokens' rows): a
/// replacement, or `None` to keep it.
pub(super) type AfterBlock<'f> = &'f mut dyn FnMut(Site, &Tensor) -> Result<Option<Tensor>>;

/// The first block's inputs ([`FluxModel::embed`]).
pub(super) struct Embedded {
    /// Image tokens after `img_in` `[B, L_img, hidden]`.
    pub img: Tensor,
    /// Text tokens after `txt_in` `[B, L_txt, hidden]`.
    pub txt: Tensor,
    /// The conditioning vector `[B, hidden]` (before SiLU).
    pub vec: Tensor,
}

impl DoubleBlock {
    fn forward(&self, img: &Tensor, txt: &Tensor, ctx: &Ctx, index: usize, heads: usize) -> Result<(Tensor, Tensor)> {
        let (img_mods, img_part) = self.img.qkv(img, ctx)?;
        let (txt_mods, txt_part) = self.txt.qkv(txt, ctx)?;
        let qkv = qkv_rope(&[txt_part, img_part], ctx, heads)?;
        let l_txt = txt.dim(1)?;
        let point = HookPoint { site: Site::Double { index }, ..ctx.point };
        // The hooks see the image tokens only.
        let (txt_attn, img_attn) = attention_with_hooks(&qkv, ctx, &point, l_txt)?;
        let img = self.img.finish(img, &img_attn, &img_mods, ctx)?;
        // A term added after the MLP (XLabs' IP-Adapter), from the image tokens' pre-RoPE query.
        let img = match &qkv.q_pre_rope {
            Some(q) => match ctx.hooks.block_output(&point, &q.narrow(2, l_txt, q.dim(2)? - l_txt)?)? {
                Some(t) => (&img + t.to_dtype(img.dtype())?)?,
                None => img,
            },
            None => img,
        };
        let txt = self.txt.finish(txt, &txt_attn.contiguous()?, &txt_mods, ctx)?;
        Ok((img, txt))
    }
}

impl SingleBlock {
    fn forward(&self, x: &Tensor, ctx: &Ctx, index: usize, cfg: &FluxConfig) -> Result<Tensor> {
        let h = cfg.hidden_size;
        let m = modulation(&self.modulation, ctx.silu_vec, 1)?;
        let xm = ctx.modulate(x, &m[0])?;
        let point = HookPoint { site: Site::Single { index }, ..ctx.point };
        // Both halves come from one dequantization of a quantized weight.
        let linear1 = self.linear1.dense()?;
        let (qkv_half, mlp_half) = (linear1.narrow_out(0, 3 * h)?, linear1.narrow_out(3 * h, cfg.mlp_hidden)?);
        // Where the fused kernels take it, two products: the QKV half now, the
        // MLP half after the attention, written beside it with GELU in its
        // epilogue. Else one product over both halves, read back as narrows.
        let lin1 = if ctx.fused.is_some_and(|f| f.takes_linear_gelu(&xm)) {
            None
        } else {
            Some(linear1.forward_no_bias(&xm)?)
        };
        let qkv = match &lin1 {
            Some(lin1) => lin1.narrow(2, 0, 3 * h)?,
            None => qkv_half.forward_no_bias(&xm)?,
        };
        let qkv = qkv_rope(&[QkvPart { qkv, bias: qkv_half.bias(), norm: &self.norm }], ctx, cfg.num_heads)?;
        let (_, attn) = attention_with_hooks(&qkv, ctx, &point, 0)?;
        let joined = match &lin1 {
            Some(lin1) => cat_bias_gelu(ctx.fused, &attn, &lin1.narrow(2, 3 * h, cfg.mlp_hidden)?, mlp_half.bias())?,
            None => cat_linear_gelu(ctx.fused, &attn, &mlp_half, &xm)?,
        };
        let out = self.linear2.forward_no_bias(&joined)?;
        ctx.gated_add(x, &out, self.linear2.bias(), &m[0].gate)
    }
}
