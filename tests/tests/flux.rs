//! Golden parity of one Flux transformer forward, with and without the
//! IP-Adapter, against diffusers' `FluxTransformer2DModel` plus the InstantX
//! processor math (tests/reference/make_flux_fixtures.py), and the hook
//! properties. Tolerances: f32 relative max error ≤ 1e-4, bf16 ≤ 2e-2
//! (`rel_max_err`, against the f32 reference).

use std::collections::HashMap;

use ipaflux::load::{load_flux, load_ip_adapter};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::hooks::{AttentionHook, HookPoint, Hooks, Site};
use ipaflux_core::flux::ip::{IpAdapterHook, IpHookConfig, IpImage, IpWeight};
use ipaflux_core::flux::sampler::{self, img_ids};
use ipaflux_core::flux::{Conditioning, FluxModel};
use ipaflux_core::schedule::{IpWindow, WeightRamp, COMFY_FLUX_SHIFT};
use ipaflux_core::{IpAdapter, IpAttentionConfig, VNorm};
use ipaflux_tests::*;

const SIGMA: f64 = 0.75;
const SCALE: f64 = 0.7;
const ROWS: usize = 4;
const COLS: usize = 6;

fn gold() -> HashMap<String, Tensor> {
    ipaflux_core::candle_core::safetensors::load(fixture("flux/golden.safetensors"), &Device::Cpu).unwrap()
}

fn model(path: &str, dtype: DType) -> FluxModel {
    let files = load_flux(&fixture(path)).unwrap();
    let axes = files.axes_dim.or(Some(vec![4, 6, 6]));
    FluxModel::from_store(files.weights, axes, dtype, &Device::Cpu).unwrap()
}

fn cond(g: &HashMap<String, Tensor>) -> Conditioning {
    Conditioning { txt: g["in.txt"].clone(), y: g["in.y"].clone(), guidance: Some(3.5) }
}

fn adapter() -> IpAdapter {
    let store = load_ip_adapter(&fixture("ip-adapter.safetensors")).unwrap();
    IpAdapter::from_store(&store, DType::F32, &Device::Cpu).unwrap()
}

fn image(embeds: &Tensor, v_norm: VNorm, weight: f64, dtype: DType) -> IpImage {
    let a = adapter();
    let kv = a.kv_all(&embeds.to_dtype(dtype).unwrap(), &IpAttentionConfig { head_dim: 16, v_norm }).unwrap();
    let kv = kv
        .into_iter()
        .map(|kv| ipaflux_core::IpKv { k: kv.k.to_dtype(dtype).unwrap(), v: kv.v.to_dtype(dtype).unwrap() })
        .collect();
    IpImage { kv, weight }
}

fn forward(m: &FluxModel, g: &HashMap<String, Tensor>, hooks: &[&dyn AttentionHook]) -> Tensor {
    m.forward(&g["in.img"], &img_ids(ROWS, COLS), &cond(g), SIGMA, 0, Hooks::new(hooks)).unwrap()
}

fn ip_hook(m: &FluxModel, images: Vec<IpImage>, cfg: IpHookConfig) -> IpAdapterHook {
    IpAdapterHook::new(images, cfg, &m.cfg).unwrap()
}

fn constant(w: f64) -> IpHookConfig {
    IpHookConfig { weight: IpWeight::Constant(w), ..Default::default() }
}

#[test]
fn forward_matches_diffusers_in_both_layouts() {
    let g = gold();
    let diffusers = model("flux/transformer", DType::F32);
    let bfl = model("flux/flux-tiny-bfl.safetensors", DType::F32);
    assert_eq!(diffusers.cfg, bfl.cfg);
    let a = forward(&diffusers, &g, &[]);
    let b = forward(&bfl, &g, &[]);
    assert_close("diffusers layout, no IP", &a, &g["out.plain"], F32_TOL);
    assert_eq!(rel_max_err(&a, &b), 0.0, "the two layouts must give identical results");
}

#[test]
fn ip_adapter_matches_instantx_and_comfyui_math() {
    let g = gold();
    for (dtype, tol) in [(DType::F32, F32_TOL), (DType::BF16, BF16_TOL)] {
        for layout in ["flux/transformer", "flux/flux-tiny-bfl.safetensors"] {
            let m = model(layout, dtype);
            for (variant, key) in [(VNorm::InstantX, "out.ip_instantx"), (VNorm::ComfyUi, "out.ip_comfyui")] {
                let hook = ip_hook(&m, vec![image(&g["in.embeds_a"], variant, 1.0, dtype)], constant(SCALE));
                let out = forward(&m, &g, &[&hook]);
                assert_close(&format!("{dtype:?} {layout} {variant:?}"), &out, &g[key], tol);
            }
        }
    }
    // The IP branch must matter at this tolerance, or the test proves nothing.
    assert!(rel_max_err(&g["out.ip_instantx"], &g["out.plain"]) > 1e-2);
    assert!(rel_max_err(&g["out.ip_instantx"], &g["out.ip_comfyui"]) > 1e-3);
}

#[test]
fn per_block_weights_match() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let cfg = IpHookConfig { block_weights: Some(vec![1.0, 0.0, 0.5, 2.0, 0.0]), ..constant(SCALE) };
    let hook = ip_hook(&m, vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)], cfg);
    assert_close("per-block weights", &forward(&m, &g, &[&hook]), &g["out.ip_blocks"], F32_TOL);
}

#[test]
fn fp8_weights_are_upcast_per_layer() {
    let g = gold();
    let m = model("flux/flux-tiny-bfl-fp8.safetensors", DType::F32);
    let hook = ip_hook(&m, vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)], constant(SCALE));
    assert_close("fp8 e4m3 weights", &forward(&m, &g, &[&hook]), &g["out.fp8_ip_instantx"], F32_TOL);
}

#[test]
fn neutral_settings_equal_no_adapter() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let plain = forward(&m, &g, &[]);
    let img = || vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)];
    let zero_weight = ip_hook(&m, img(), constant(0.0));
    let zero_blocks = ip_hook(&m, img(), IpHookConfig { block_weights: Some(vec![0.0; 5]), ..constant(1.0) });
    // start 60 %, end 40 %: sigma_end > sigma_start, nothing is inside.
    let empty = ip_hook(
        &m,
        img(),
        IpHookConfig { window: IpWindow::from_percent(0.6, 0.4, COMFY_FLUX_SHIFT), ..constant(1.0) },
    );
    // A window that excludes this sigma (0.7) only.
    let outside =
        ip_hook(&m, img(), IpHookConfig { window: IpWindow { sigma_start: 0.5, sigma_end: 0.0 }, ..constant(1.0) });
    for (what, hook) in [
        ("weight 0", &zero_weight),
        ("block weights 0", &zero_blocks),
        ("empty window", &empty),
        ("outside window", &outside),
    ] {
        assert_eq!(rel_max_err(&forward(&m, &g, &[hook]), &plain), 0.0, "{what} must equal no adapter");
    }
    let inside =
        ip_hook(&m, img(), IpHookConfig { window: IpWindow { sigma_start: 0.8, sigma_end: 0.6 }, ..constant(1.0) });
    assert!(rel_max_err(&forward(&m, &g, &[&inside]), &plain) > 1e-2);
}

#[test]
fn different_reference_images_give_different_outputs_and_weights_add() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let a = ip_hook(&m, vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)], constant(SCALE));
    let b = ip_hook(&m, vec![image(&g["in.embeds_b"], VNorm::InstantX, 1.0, DType::F32)], constant(SCALE));
    let (oa, ob) = (forward(&m, &g, &[&a]), forward(&m, &g, &[&b]));
    assert!(rel_max_err(&oa, &ob) > 1e-2, "two reference images gave the same output");
    // One adapter, two images with weights 0.5 + 0.5 of the same embeds = weight 1 of one image.
    let halves = ip_hook(
        &m,
        vec![
            image(&g["in.embeds_a"], VNorm::InstantX, 0.5, DType::F32),
            image(&g["in.embeds_a"], VNorm::InstantX, 0.5, DType::F32),
        ],
        constant(SCALE),
    );
    assert!(rel_max_err(&forward(&m, &g, &[&halves]), &oa) < 1e-5);
}

/// A second adapter: adds a constant to the image stream of double block 0 only.
struct Offset {
    calls: std::sync::atomic::AtomicUsize,
}

impl AttentionHook for Offset {
    fn name(&self) -> &str {
        "offset"
    }
    fn attention(&self, at: &HookPoint, q: &Tensor, attn: &Tensor) -> ipaflux_core::Result<Option<Tensor>> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(q.dims()[1], 3, "query is [B, H, L, D]");
        assert!((at.sigma - SIGMA).abs() < 1e-12);
        match at.site {
            Site::Double { index: 0 } => {
                assert_eq!(q.dims()[2], ROWS * COLS, "double blocks see the image tokens' query");
                Ok(Some((attn + 0.25)?))
            }
            Site::Single { .. } => {
                assert_eq!(q.dims()[2], ROWS * COLS + at.txt_len, "single blocks see all tokens");
                Ok(None)
            }
            Site::Double { .. } => Ok(None),
        }
    }
}

#[test]
fn two_adapters_stack() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let ip = ip_hook(&m, vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)], constant(SCALE));
    let offset = Offset { calls: Default::default() };
    let both = forward(&m, &g, &[&ip, &offset]);
    assert_eq!(offset.calls.load(std::sync::atomic::Ordering::Relaxed), 5, "one call per block");
    let ip_only = forward(&m, &g, &[&ip]);
    let offset_only = forward(&m, &g, &[&offset]);
    assert!(rel_max_err(&both, &ip_only) > 1e-3, "the second adapter had no effect");
    assert!(rel_max_err(&both, &offset_only) > 1e-3, "the IP-Adapter had no effect");
    // Order does not matter for additive adapters.
    assert!(rel_max_err(&forward(&m, &g, &[&offset, &ip]), &both) < 1e-5);
}

#[test]
fn ramp_is_counted_per_step() {
    let m = model("flux/transformer", DType::F32);
    let g = gold();
    let hook = ip_hook(
        &m,
        vec![image(&g["in.embeds_a"], VNorm::InstantX, 0.5, DType::F32)],
        IpHookConfig { weight: IpWeight::Ramp(WeightRamp { start: 1.0, end: 0.0, steps: 3 }), ..Default::default() },
    );
    let at = |step| HookPoint { site: Site::Single { index: 1 }, depth: 2, sigma: 0.5, step, txt_len: 7 };
    let s: Vec<f64> = (0..4).map(|i| hook.scale(&at(i), 0)).collect();
    assert_eq!(s, vec![0.5, 0.25, 0.0, 0.0]);
}

#[test]
fn bad_settings_are_refused() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let img = || vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)];
    let e = IpAdapterHook::new(img(), constant(5.5), &m.cfg).unwrap_err().to_string();
    assert!(e.contains("outside the accepted range"), "{e}");
    let e = IpAdapterHook::new(img(), IpHookConfig { block_weights: Some(vec![1.0; 57]), ..constant(1.0) }, &m.cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("57 per-block IP weights") && e.contains("5 blocks"), "{e}");
    // An adapter made for FLUX.1 (3072 wide, 57 blocks) does not fit the tiny model.
    let dims = ipaflux_core::IpAdapterDims { hidden: 3072, num_processors: 57, ..adapter().dims };
    let e = ipaflux_core::flux::ip::check_compatible(&dims, &m.cfg).unwrap_err().to_string();
    assert!(e.contains("hidden size 3072") && e.contains("hidden size 48"), "{e}");
}

#[test]
fn missing_and_misshaped_flux_tensors_are_all_reported() {
    let files = load_flux(&fixture("flux/flux-tiny-bfl.safetensors")).unwrap();
    let store = files.weights.filter_rename(|n| {
        (n != "single_blocks.2.linear2.weight" && n != "double_blocks.1.txt_attn.proj.bias").then(|| n.to_string())
    });
    let e = FluxModel::from_store(store, Some(vec![4, 6, 6]), DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("single_blocks.2.linear2.weight") && e.contains("double_blocks.1.txt_attn.proj.bias"), "{e}");
    let e =
        FluxModel::from_store(load_flux(&fixture("flux/transformer")).unwrap().weights, None, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
    assert!(e.contains("RoPE axes"), "{e}");
}

#[test]
fn euler_sampling_is_deterministic_for_a_seed() {
    let g = gold();
    let m = model("flux/transformer", DType::F32);
    let ip = ip_hook(&m, vec![image(&g["in.embeds_a"], VNorm::InstantX, 1.0, DType::F32)], constant(SCALE));
    let (w, h) = (COLS * 16, ROWS * 16);
    let sigmas = ipaflux_core::schedule::flux_schedule(3, ROWS * COLS, ipaflux_core::schedule::Shift::DEV);
    let run = |seed| {
        let x = sampler::pack(&sampler::noise(seed, w, h, &Device::Cpu).unwrap()).unwrap();
        let mut steps = Vec::new();
        let out = sampler::euler(
            &m,
            sampler::Start::Noise(&x),
            &img_ids(ROWS, COLS),
            sampler::Guide::prompt(&cond(&g)),
            &sigmas,
            Hooks::new(&[&ip]),
            &mut |s| steps.push(s.step),
        )
        .unwrap();
        assert_eq!(steps, vec![0, 1, 2]);
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
    assert!(a.iter().all(|x| x.is_finite()));
}
