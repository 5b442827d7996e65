//! Host transcriptions of the CUDA block kernels' index math (the `ipaflux`
//! crate's `qkv_rope`, `gated_add` with bias, GELU after a head
//! (`gelu_tanh_after`) and the merged-heads attention epilogue), plugged into the model through the same seams
//! ([`FusedModulation`], [`FusedAttention`]). The model with them must equal
//! the reference path: this checks, without a GPU, that the seams hand the
//! kernels what they expect (strided rows, stream offsets into the RoPE
//! tables, the output layouts, the pre-RoPE query for hooks). The kernels
//! themselves are checked against the reference on a GPU by `gpu-check`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::hooks::{AttentionHook, HookPoint, Hooks};
use super::ip::{IpAdapterHook, IpHookConfig, IpImage};
use super::testing::{inputs, random_model, tiny, Inputs};
use crate::error::Result;
use crate::ip_adapter::IpKv;
use crate::nn::{sdpa, Attention, ExtraAttention, FusedAttention, FusedModulation, QkvOut, QkvStreams};

/// `x`'s elements in memory order over its layout (any strides), as f32.
fn host(x: &Tensor) -> Vec<f32> {
    x.to_dtype(DType::F32).and_then(|x| x.flatten_all()?.to_vec1::<f32>()).unwrap_or_default()
}

/// Rows of `x [B, L, W]` (the kernel reads them at their stride in place;
/// the mirror from a contiguous copy).
fn rows(x: &Tensor) -> Vec<Vec<f32>> {
    let (b, l, w) = x.dims3().unwrap_or((0, 0, 0));
    let flat = host(x);
    (0..b * l).map(|r| flat[r * w..(r + 1) * w].to_vec()).collect()
}

#[derive(Debug, Default)]
struct Mirror {
    /// Calls of `attend_merged_extra` (the fused IP term), to show the path ran.
    extra_calls: AtomicUsize,
    /// Say that extra terms are never taken (`takes_extra`), as a kernel
    /// without the `_ip` entry points does.
    no_extra: bool,
    /// Calls of `gelu_tanh_after` (the single blocks' joined `linear2` input).
    gelu_after_calls: AtomicUsize,
    /// Take the linear layers with GELU in the product's epilogue
    /// (`linear_gelu_tanh`, `linear_gelu_tanh_after`), as the cuBLASLt path does.
    linear_gelu: bool,
    /// Calls of `linear_gelu_tanh` and of `linear_gelu_tanh_after`.
    linear_gelu_calls: AtomicUsize,
    linear_after_calls: AtomicUsize,
}

/// Rows of GELU-tanh(x Wᵀ + bias) in f32 as a product's epilogue computes
/// them (`weight [N, K]` read in its logical order: a narrow of a larger
/// weight's rows reads as its own rows).
fn linear_gelu_rows(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Vec<Vec<f32>>> {
    let (n, k) = weight.dims2().ok()?;
    let bs = bias.map(host).unwrap_or_else(|| vec![0.0; n]);
    let xs = rows(x);
    (xs.first().map_or(k, Vec::len) == k).then(|| {
        let y = crate::kernels::host_linear(&xs.concat(), &host(weight), &bs, k);
        y.chunks_exact(n).map(|r| r.iter().copied().map(crate::kernels::gelu_tanh).collect()).collect()
    })
}

impl FusedModulation for Mirror {
    fn name(&self) -> &'static str {
        "host mirror of the CUDA block kernels"
    }

    fn ln_modulate(&self, _: &Tensor, _: &Tensor, _: &Tensor, _: f64) -> Option<Result<Tensor>> {
        None
    }

    /// `out[i] = x[i] + (y[i] + bias[c]) · gate[item, c]` in f32, one rounding.
    fn gated_add(&self, x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: &Tensor) -> Option<Result<Tensor>> {
        let (b, l, h) = x.dims3().ok()?;
        let (xs, ys, gs) = (host(x), host(y), host(gate));
        let bs = bias.map(host);
        let per_item = l * h;
        let out: Vec<f32> = (0..b * l * h)
            .map(|i| {
                let (item, c) = (i / per_item, i % h);
                let yb = ys[i] + bs.as_ref().map_or(0.0, |b| b[c]);
                xs[i] + yb * gs[item * h + c]
            })
            .collect();
        Some(Tensor::from_vec(out, (b, l, h), x.device()).map_err(Into::into))
    }

    /// Row by row as the kernel's output rows: the head's `A` values, then
    /// GELU-tanh of `x + bias` (x read at its row stride), in f32.
    fn gelu_tanh_after(&self, head: &Tensor, x: &Tensor, bias: Option<&Tensor>) -> Option<Result<Tensor>> {
        let (b, l, a) = head.dims3().ok()?;
        let w = x.dims3().ok()?.2;
        let (heads, xs) = (rows(head), rows(x));
        let bs = bias.map(host).unwrap_or_else(|| vec![0.0; w]);
        let out: Vec<f32> = heads
            .iter()
            .zip(&xs)
            .flat_map(|(hr, xr)| {
                hr.iter().copied().chain((0..w).map(|c| crate::kernels::gelu_tanh(xr[c] + bs[c]))).collect::<Vec<_>>()
            })
            .collect();
        self.gelu_after_calls.fetch_add(1, Ordering::Relaxed);
        Some(Tensor::from_vec(out, (b, l, a + w), x.device()).map_err(Into::into))
    }

    fn takes_linear_gelu(&self, _x: &Tensor) -> bool {
        self.linear_gelu
    }

    fn linear_gelu_tanh(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Option<Result<Tensor>> {
        if !self.linear_gelu {
            return None;
        }
        let (b, l, _) = x.dims3().ok()?;
        let n = weight.dim(0).ok()?;
        let out: Vec<f32> = linear_gelu_rows(x, weight, bias)?.concat();
        self.linear_gelu_calls.fetch_add(1, Ordering::Relaxed);
        Some(Tensor::from_vec(out, (b, l, n), x.device()).map_err(Into::into))
    }

    /// The head's row, then the product's row written beside it.
    fn linear_gelu_tanh_after(
        &self,
        head: &Tensor,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        if !self.linear_gelu {
            return None;
        }
        let (b, l, a) = head.dims3().ok()?;
        let n = weight.dim(0).ok()?;
        let out: Vec<f32> =
            rows(head).into_iter().zip(linear_gelu_rows(x, weight, bias)?).flat_map(|(h, y)| [h, y].concat()).collect();
        self.linear_after_calls.fetch_add(1, Ordering::Relaxed);
        Some(Tensor::from_vec(out, (b, l, a + n), x.device()).map_err(Into::into))
    }

    /// One (row, head) at a time as the kernel's warps: bias, RMSNorm with
    /// scale over the head, RoPE by the row's position in the concatenation;
    /// output `[P, B, H, L_total, D]` (P = 4 with the pre-RoPE query).
    fn qkv_rope(&self, s: &QkvStreams<'_>) -> Option<Result<QkvOut>> {
        let first = s.streams.first()?;
        let (b, _, w) = first.qkv.dims3().ok()?;
        let (h, d) = (s.heads, w / (3 * s.heads));
        let l_total: usize = s.streams.iter().map(|st| st.qkv.dim(1).unwrap_or(0)).sum();
        let (cos, sin) = (host(s.cos), host(s.sin));
        let parts = if s.keep_q { 4 } else { 3 };
        let mut out = vec![0f32; parts * b * h * l_total * d];
        let at = |p: usize, bi: usize, hi: usize, t: usize, c: usize| (((p * b + bi) * h + hi) * l_total + t) * d + c;
        let mut offset = 0;
        for st in s.streams {
            let l = st.qkv.dim(1).ok()?;
            let src = rows(st.qkv);
            let bias = st.bias.map(host).unwrap_or_else(|| vec![0.0; 3 * h * d]);
            let scales = [host(st.q_scale), host(st.k_scale)];
            for (r, row) in src.iter().enumerate() {
                let (bi, t) = (r / l, offset + r % l);
                for hi in 0..h {
                    for part in 0..3 {
                        let base = part * h * d + hi * d;
                        let x: Vec<f32> = (0..d).map(|c| row[base + c] + bias[base + c]).collect();
                        if part == 2 {
                            (0..d).for_each(|c| out[at(2, bi, hi, t, c)] = x[c]);
                            continue;
                        }
                        let ss: f32 = x.iter().map(|v| v * v).sum();
                        let rstd = 1.0 / (ss / d as f32 + s.eps as f32).sqrt();
                        let y: Vec<f32> = (0..d).map(|c| x[c] * rstd * scales[part][c]).collect();
                        if part == 0 && s.keep_q {
                            (0..d).for_each(|c| out[at(3, bi, hi, t, c)] = y[c]);
                        }
                        for p in 0..d / 2 {
                            let (cs, sn) = (cos[t * d / 2 + p], sin[t * d / 2 + p]);
                            let (y0, y1) = (y[2 * p], y[2 * p + 1]);
                            out[at(part, bi, hi, t, 2 * p)] = y0 * cs - y1 * sn;
                            out[at(part, bi, hi, t, 2 * p + 1)] = y0 * sn + y1 * cs;
                        }
                    }
                }
            }
            offset += l;
        }
        let all = match Tensor::from_vec(out, (parts, b, h, l_total, d), first.qkv.device()) {
            Ok(t) => t,
            Err(e) => return Some(Err(e.into())),
        };
        let get = |p: usize| -> Result<Tensor> { Ok(all.get(p)?) };
        let out = || -> Result<QkvOut> {
            let q_pre_rope = if s.keep_q { Some(get(3)?) } else { None };
            Ok(QkvOut { q: get(0)?, k: get(1)?, v: get(2)?, q_pre_rope })
        };
        Some(out())
    }
}

impl FusedAttention for Mirror {
    fn name(&self) -> &'static str {
        "host mirror of the merged-heads epilogue"
    }

    fn attend(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Option<Result<Tensor>> {
        None
    }

    /// The reference attention `[B, H, L, D]`, stored as the kernel's epilogue
    /// does: element (b, h, r, c) at `((b·L + r)·H + h)·D + c`, `base + s·o`.
    fn attend_merged(&self, q: &Tensor, k: &Tensor, v: &Tensor, add: Option<(&Tensor, f64)>) -> Option<Result<Tensor>> {
        let (b, h, l, d) = q.dims4().ok()?;
        let o = host(&sdpa(q, k, v).ok()?);
        let base = add.map(|(t, _)| host(t));
        let scale = add.map_or(1.0, |(_, s)| s as f32);
        let mut out = vec![0f32; b * l * h * d];
        for bi in 0..b {
            for hi in 0..h {
                for r in 0..l {
                    for c in 0..d {
                        let idx = ((bi * l + r) * h + hi) * d + c;
                        let val = o[((bi * h + hi) * l + r) * d + c];
                        out[idx] = base.as_ref().map_or(val, |bs| bs[idx] + scale * val);
                    }
                }
            }
        }
        Some(Tensor::from_vec(out, (b, l, h * d), q.device()).map_err(Into::into))
    }

    fn takes_extra(&self) -> bool {
        !self.no_extra
    }

    /// The merged attention, then, as the `_ip` kernels' second pass, rows
    /// `row0..` of each (item, head) get `scale ·` the extra attention of
    /// that row added at its merged index.
    fn attend_merged_extra(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        x: &ExtraAttention<'_>,
    ) -> Option<Result<Tensor>> {
        self.extra_calls.fetch_add(1, Ordering::Relaxed);
        let (b, h, l, d) = q.dims4().ok()?;
        let mut out = host(&self.attend_merged(q, k, v, None)?.ok()?);
        let term = host(&sdpa(x.q, x.k, x.v).ok()?);
        for bi in 0..b {
            for hi in 0..h {
                for r in x.row0..l {
                    for c in 0..d {
                        out[((bi * l + r) * h + hi) * d + c] += x.scale as f32 * term[((bi * h + hi) * l + r) * d + c];
                    }
                }
            }
        }
        Some(Tensor::from_vec(out, (b, l, h * d), q.device()).map_err(Into::into))
    }
}

/// Adds `0.5 · q` (heads merged) to the attention output: a hook whose effect
/// depends on the exact pre-RoPE query it is given.
#[derive(Debug)]
struct QueryEcho;

impl AttentionHook for QueryEcho {
    fn name(&self) -> &str {
        "query echo"
    }

    fn attention(&self, _at: &HookPoint, q: &Tensor, attn: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((attn + (crate::nn::merge_heads(q)? * 0.5)?)?))
    }
}

/// Two batch items (the kernels index items apart from rows).
fn batch_of_two(cfg: &super::FluxConfig) -> Inputs {
    let (a, b) = (inputs(cfg), inputs(cfg));
    let cat = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0).unwrap();
    Inputs {
        img: cat(&a.img, &b.img),
        ids: a.ids,
        cond: super::model::Conditioning {
            txt: cat(&a.cond.txt, &b.cond.txt),
            y: cat(&a.cond.y, &b.cond.y),
            guidance: a.cond.guidance,
        },
    }
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (host(a), host(b));
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The tiny model with `modulation` and the mirrored attention against the
/// reference path, without and with a hook (f32 both ways; only the order
/// of operations differs); gives the plain model and its inputs back.
fn mirrored_equals_reference(cfg: &super::FluxConfig, modulation: Arc<Mirror>) -> (super::FluxModel, Inputs) {
    let plain = random_model(cfg);
    let mut fused = plain.clone();
    fused.set_fused_modulation(Some(modulation));
    fused.set_attention(Attention::fused(Arc::new(Mirror::default())));
    let x = batch_of_two(cfg);
    let echo = QueryEcho;
    let hook_list: [&dyn AttentionHook; 1] = [&echo];
    for hooks in [Hooks::none(), Hooks::new(&hook_list)] {
        let run = |m: &super::FluxModel| m.forward(&x.img, &x.ids, &x.cond, 0.7, 0, hooks).unwrap();
        let err = max_rel_err(&run(&fused), &run(&plain));
        assert!(err < 1e-5, "mirror vs reference: {err:e} (hooks: {})", !hooks.is_empty());
    }
    (plain, x)
}

#[test]
fn kernel_mirror_through_the_seams_equals_the_reference_path() {
    let cfg = tiny();
    let modulation = Arc::new(Mirror::default());
    let (plain, x) = mirrored_equals_reference(&cfg, modulation.clone());
    // Every single block took the joined GELU, both runs.
    assert_eq!(modulation.gelu_after_calls.load(Ordering::Relaxed), 2 * cfg.depth_single);
    // The hook changes the output, so a wrong pre-RoPE query would have shown.
    let echo = QueryEcho;
    let hook_list: [&dyn AttentionHook; 1] = [&echo];
    let none = plain.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::none()).unwrap();
    let echoed = plain.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::new(&hook_list)).unwrap();
    assert!(max_rel_err(&echoed, &none) > 1e-3);
}

#[test]
fn linear_layers_with_gelu_in_the_product_through_the_seams_equal_the_reference_path() {
    // The MLP products with GELU in their epilogue (the cuBLASLt path), the
    // single blocks' first layer split in its QKV and MLP halves.
    let cfg = tiny();
    let modulation = Arc::new(Mirror { linear_gelu: true, ..Mirror::default() });
    mirrored_equals_reference(&cfg, modulation.clone());
    // Both streams of every double block, every single block, both runs; the
    // separate GELU kernels never.
    assert_eq!(modulation.linear_gelu_calls.load(Ordering::Relaxed), 2 * 2 * cfg.depth);
    assert_eq!(modulation.linear_after_calls.load(Ordering::Relaxed), 2 * cfg.depth_single);
    assert_eq!(modulation.gelu_after_calls.load(Ordering::Relaxed), 0);
}

#[test]
fn ip_attention_added_in_the_epilogue_equals_the_reference_sum() {
    let dev = Device::Cpu;
    let (b, h, l, s, d) = (2, 3, 7, 5, 8);
    let q = Tensor::randn(0f32, 1.0, (b, h, l, d), &dev).unwrap();
    let kv = crate::ip_adapter::IpKv {
        k: Tensor::randn(0f32, 1.0, (1, h, s, d), &dev).unwrap(),
        v: Tensor::randn(0f32, 1.0, (1, h, s, d), &dev).unwrap(),
    };
    let base = Tensor::randn(0f32, 1.0, (b, l, h * d), &dev).unwrap();
    let reference = (&base + kv.attend(&q, 0.8).unwrap()).unwrap();
    let mirrored = kv.attend_add(&q, 0.8, &base, &Attention::fused(Arc::new(Mirror::default()))).unwrap();
    let plain = kv.attend_add(&q, 0.8, &base, &Attention::reference()).unwrap();
    assert_eq!(host(&plain), host(&reference), "the reference path is the same sum");
    assert!(max_rel_err(&mirrored, &reference) < 1e-6);
}

/// Random K/V for every block of `cfg`, cached for one batch item (the model
/// broadcasts them), `s` image tokens.
fn random_ip_image(cfg: &super::FluxConfig, s: usize, weight: f64) -> IpImage {
    let (h, d) = (cfg.num_heads, cfg.hidden_size / cfg.num_heads);
    let t = || Tensor::randn(0f32, 1.0, (1, h, s, d), &Device::Cpu).unwrap();
    IpImage { kv: (0..cfg.num_blocks()).map(|_| IpKv { k: t(), v: t() }).collect(), weight }
}

#[test]
fn ip_term_fused_into_the_block_attention_equals_the_hook_path() {
    let cfg = tiny();
    let plain = random_model(&cfg);
    let mirror = Arc::new(Mirror::default());
    let mut fused = plain.clone();
    fused.set_fused_modulation(Some(Arc::new(Mirror::default())));
    fused.set_attention(Attention::fused(mirror.clone()));
    let x = batch_of_two(&cfg);
    let one = IpAdapterHook::new(vec![random_ip_image(&cfg, 4, 0.9)], IpHookConfig::default(), &cfg).unwrap();
    let two = IpAdapterHook::new(
        vec![random_ip_image(&cfg, 4, 0.9), random_ip_image(&cfg, 3, 0.6)],
        IpHookConfig::default(),
        &cfg,
    )
    .unwrap();
    let run = |m: &super::FluxModel, hook: &IpAdapterHook| {
        let list: [&dyn AttentionHook; 1] = [hook];
        m.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::new(&list)).unwrap()
    };
    // One image: its term goes into every block's attention launch.
    let (reference, mirrored) = (run(&plain, &one), run(&fused, &one));
    assert_eq!(mirror.extra_calls.load(Ordering::Relaxed), cfg.num_blocks());
    let err = max_rel_err(&mirrored, &reference);
    assert!(err < 1e-5, "fused IP term vs hook path: {err:e}");
    // The term matters, so a wrong row offset or query would have shown.
    let none = plain.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::none()).unwrap();
    assert!(max_rel_err(&reference, &none) > 1e-3);
    // Two images: not one term, so the hooks run after the attention.
    let (reference, mirrored) = (run(&plain, &two), run(&fused, &two));
    assert_eq!(mirror.extra_calls.load(Ordering::Relaxed), cfg.num_blocks(), "no fused call for two images");
    assert!(max_rel_err(&mirrored, &reference) < 1e-5);
}

/// An IP-Adapter hook that counts how often the model asks for its term.
struct Counting<'a> {
    inner: &'a IpAdapterHook,
    asked: AtomicUsize,
}

impl AttentionHook for Counting<'_> {
    fn name(&self) -> &str {
        "counting IP-Adapter"
    }

    fn attention(&self, at: &HookPoint, q: &Tensor, attn: &Tensor) -> Result<Option<Tensor>> {
        self.inner.attention(at, q, attn)
    }

    fn contribution(&self, at: &HookPoint, q: &Tensor) -> Result<super::hooks::Contribution> {
        self.asked.fetch_add(1, Ordering::Relaxed);
        self.inner.contribution(at, q)
    }
}

#[test]
fn hooks_are_asked_for_a_term_only_where_the_kernel_takes_one() {
    let cfg = tiny();
    let plain = random_model(&cfg);
    let x = batch_of_two(&cfg);
    let ip = IpAdapterHook::new(vec![random_ip_image(&cfg, 4, 0.9)], IpHookConfig::default(), &cfg).unwrap();
    let reference = {
        let list: [&dyn AttentionHook; 1] = [&ip];
        plain.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::new(&list)).unwrap()
    };
    for (no_extra, asked) in [(true, 0), (false, cfg.num_blocks())] {
        let mirror = Arc::new(Mirror { no_extra, ..Mirror::default() });
        let mut m = plain.clone();
        m.set_attention(Attention::fused(mirror.clone()));
        let counting = Counting { inner: &ip, asked: AtomicUsize::new(0) };
        let list: [&dyn AttentionHook; 1] = [&counting];
        let out = m.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::new(&list)).unwrap();
        assert_eq!(counting.asked.load(Ordering::Relaxed), asked, "terms asked for (no_extra: {no_extra})");
        assert_eq!(mirror.extra_calls.load(Ordering::Relaxed), asked, "fused calls (no_extra: {no_extra})");
        assert!(max_rel_err(&out, &reference) < 1e-5, "same result either way (no_extra: {no_extra})");
    }
    // The reference path (no fused kernel) never asks either.
    let counting = Counting { inner: &ip, asked: AtomicUsize::new(0) };
    let list: [&dyn AttentionHook; 1] = [&counting];
    plain.forward(&x.img, &x.ids, &x.cond, 0.7, 0, Hooks::new(&list)).unwrap();
    assert_eq!(counting.asked.load(Ordering::Relaxed), 0);
}
