//! Flux ControlNets (diffusers' `FluxControlNetModel`: InstantX's and
//! Shakker-Labs' kind) against diffusers' `FluxControlNetPipeline`
//! (tests/reference/make_controlnet_fixtures.py) on two tiny random nets: a
//! Canny-like one (1 double and 2 single blocks feeding the tiny Flux's 2 and
//! 3, a guidance embedding) and a Union one (2 double blocks, control mode 2,
//! no guidance embedding, with true CFG). Checked: the control latents, the
//! nets' residuals at the first step, and the final latents with each net's
//! conditioning scale and step window, from noise and (the Canny net,
//! `FluxControlNetImg2ImgPipeline` and `FluxControlNetInpaintPipeline`) from
//! an init image, with a mask too; and with XLabs' IP-Adapter. Several nets at
//! once against diffusers' `FluxMultiControlNetModel`
//! (make_multi_controlnet_fixtures.py): two nets of one size, and one Union
//! net in two modes. Tolerance: f32 relative max error ≤ 1e-4.

use ipaflux::generate::control_latents;
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::flux::sampler::{self, Guide, Start};
use ipaflux_core::flux::{BlockId, ControlInput, ControlNetDims, ControlWindow, FluxControlNet, Hooks, HostBlocks};
use ipaflux_tests::*;
use std::sync::Arc;

fn net(rel: &str) -> FluxControlNet {
    let files = ipaflux::load::load_controlnet(&fixture(rel)).expect("tiny ControlNet");
    // A single file has no config: the tiny nets' RoPE axes (FLUX.1's need none).
    let axes = files.axes_dim.or(Some(vec![4, 6, 6]));
    FluxControlNet::from_store(files.weights, axes, DType::F32, &Device::Cpu).expect("tiny ControlNet loads")
}

struct Case {
    cond: Tensor,
    noise: Tensor,
    run: PipelineRun,
    prompt: ipaflux_core::flux::Conditioning,
}

fn case() -> Case {
    let (i2i, r) = (tensors("img2img/golden.safetensors"), json("controlnet/reference.json"));
    let run = PipelineRun::of(&r);
    let control = fixture_image("control/control.png");
    let cond = control_latents(&tiny_vae_encoder(), &control, (run.width, run.height), &Device::Cpu).unwrap();
    let prompt = run.cond(&i2i["pipe.prompt_embeds"], &i2i["pipe.pooled"]);
    Case { cond, noise: sampler::pack(&i2i["pipe.noise"]).unwrap(), run, prompt }
}

fn window(r: &serde_json::Value) -> ControlWindow {
    ControlWindow::Steps { start: r["start"].as_f64().unwrap(), end: r["end"].as_f64().unwrap() }
}

/// `net` on `image` as reference.json's entry `r` ran it: its scale, window and mode.
fn control_input<'a>(net: &'a FluxControlNet, image: &'a Tensor, r: &serde_json::Value) -> ControlInput<'a> {
    let mode = r["mode"].as_u64().map(|m| m as usize);
    ControlInput { net, image, mode, scale: r["scale"].as_f64().unwrap(), window: window(r) }
}

#[test]
fn controlnet_residuals_match_diffusers() {
    let (g, r, c) = (tensors("controlnet/golden.safetensors"), json("controlnet/reference.json"), case());
    assert_close("control latents", &c.cond, &g["cond"], F32_TOL);
    let ids = c.run.ids();
    // Each net's inputs at the first step of its window.
    for (name, mode) in [("canny", None), ("union", Some(2))] {
        let scale = r[name]["scale"].as_f64().unwrap();
        let (x, sigma) = (&g[&format!("{name}.x")], g[&format!("{name}.sigma")].to_vec1::<f32>().unwrap()[0]);
        let res = net(&format!("controlnet/{name}")).forward(x, &ids, &c.cond, mode, &c.prompt, sigma.into(), scale);
        let res = res.unwrap();
        let count = |kind: &str| g.keys().filter(|k| k.starts_with(&format!("{name}.{kind}."))).count();
        assert_eq!((res.double.len(), res.single.len()), (count("double"), count("single")), "{name}");
        for (kind, list) in [("double", &res.double), ("single", &res.single)] {
            for (i, t) in list.iter().enumerate() {
                assert_close(&format!("{name} {kind} residual {i}"), t, &g[&format!("{name}.{kind}.{i}")], F32_TOL);
            }
        }
    }
    // A Union net needs its mode; a plain one refuses one.
    let sigma = 1.0;
    assert!(net("controlnet/union").forward(&c.noise, &ids, &c.cond, None, &c.prompt, sigma, 1.0).is_err());
    assert!(net("controlnet/union").forward(&c.noise, &ids, &c.cond, Some(10), &c.prompt, sigma, 1.0).is_err());
    assert!(net("controlnet/canny").forward(&c.noise, &ids, &c.cond, Some(0), &c.prompt, sigma, 1.0).is_err());
}

#[test]
fn a_controlnet_is_checked_against_flux_from_its_header() {
    let files = ipaflux::load::load_controlnet(&fixture("controlnet/union")).unwrap();
    let dims = ControlNetDims::infer(&files.weights).unwrap();
    assert_eq!((dims.blocks.depth, dims.blocks.depth_single, dims.modes), (2, 0, Some(10)));
    let tiny = ipaflux::load::flux_config(&fixture("flux/transformer")).unwrap();
    dims.check_compatible(&tiny).unwrap();
    let err = dims.check_compatible(&ipaflux_core::flux::FluxConfig::dev()).unwrap_err().to_string();
    assert!(err.contains("hidden size is 48") && err.contains("3072"), "{err}");
    // Flux itself is not a ControlNet.
    let flux = ipaflux::load::load_flux(&fixture("flux/transformer")).unwrap();
    assert!(ControlNetDims::infer(&flux.weights).unwrap_err().to_string().contains("controlnet_x_embedder"));
}

#[test]
fn controlnet_sampling_matches_diffusers_pipeline() {
    let (g, r, c) = (tensors("controlnet/golden.safetensors"), json("controlnet/reference.json"), case());
    let model = tiny_flux("flux/transformer");
    let ids = c.run.ids();
    let sample = |guide: Guide<'_>| {
        sampler::euler(&model, Start::Noise(&c.noise), &ids, guide, &c.run.sigmas(), Hooks::none(), &mut |_| {})
            .unwrap()
    };

    let canny = net("controlnet/canny");
    let rc = &r["canny"];
    let input = control_input(&canny, &c.cond, rc);
    let out = sample(Guide { control: &[input], ..Guide::prompt(&c.prompt) });
    assert_close("Canny ControlNet", &out, &g["out.canny"], F32_TOL);
    // Without its window (active every step) the result differs: the window is what matched.
    let always = ControlInput { window: ControlWindow::default(), ..input };
    assert!(
        rel_max_err(&sample(Guide { control: &[always], ..Guide::prompt(&c.prompt) }), &g["out.canny"])
            > 10.0 * F32_TOL
    );
    // ComfyUI's percents 0..0: the first step alone (σ = 1), as diffusers' 0..1/6.
    let first = |window| sample(Guide { control: &[ControlInput { window, ..input }], ..Guide::prompt(&c.prompt) });
    let by_sigma = first(ControlWindow::from_percent(0.0, 0.0));
    assert_eq!(rel_max_err(&by_sigma, &first(ControlWindow::Steps { start: 0.0, end: 1.0 / 6.0 })), 0.0);
    assert!(rel_max_err(&by_sigma, &out) > 10.0 * F32_TOL, "a window of one step is not the golden's");
    // Without the net, far off.
    assert!(rel_max_err(&sample(Guide::prompt(&c.prompt)), &g["out.canny"]) > 100.0 * F32_TOL);
    // From an init image (FluxControlNetImg2ImgPipeline): the window spans the steps that run.
    let strength = rc["img2img_strength"].as_f64().unwrap();
    let vae = tiny_vae_encoder();
    let pixels = ipaflux::vae::from_rgb8(&fixture_image("img2img/init.png"), &Device::Cpu).unwrap();
    let image = sampler::pack(&vae.encode(&pixels).unwrap()).unwrap();
    let start = Start::Image { image: &image, noise: &c.noise, mask: None };
    let guide = Guide { control: &[input], ..Guide::prompt(&c.prompt) };
    let out = sampler::euler(&model, start, &ids, guide, &c.run.sigmas_at(strength), Hooks::none(), &mut |_| {});
    assert_close(
        &format!("Canny ControlNet, image-to-image at {strength}"),
        &out.unwrap(),
        &g["out.canny.img2img"],
        F32_TOL,
    );
    // Inpainting (FluxControlNetInpaintPipeline).
    let strength = rc["inpaint_strength"].as_f64().unwrap();
    let luma = ipaflux_core::preprocess::to_luma(&fixture_image("inpaint/mask.png"));
    let mask = sampler::latent_mask(&luma, c.run.width, c.run.height, &Device::Cpu).unwrap();
    let start = Start::Image { image: &image, noise: &c.noise, mask: Some(&mask) };
    let out = sampler::euler(&model, start, &ids, guide, &c.run.sigmas_at(strength), Hooks::none(), &mut |_| {});
    let what = format!("Canny ControlNet, inpainting at {strength}");
    assert_close(&what, &out.unwrap(), &g["out.canny.inpaint"], F32_TOL);

    let union = net("controlnet/union");
    let ru = &r["union"];
    let input = control_input(&union, &c.cond, ru);
    let negative = c.run.cond(&g["negative.embeds"], &g["negative.pooled"]);
    let true_cfg = ru["true_cfg"].as_f64().unwrap() as f32;
    let guide = Guide { control: &[input], negative: Some((&negative, true_cfg)), ..Guide::prompt(&c.prompt) };
    assert_close("Union ControlNet, mode 2, true CFG", &sample(guide), &g["out.union"], F32_TOL);
    let other_mode = ControlInput { mode: Some(0), ..input };
    let guide = Guide { control: &[other_mode], ..guide };
    assert!(rel_max_err(&sample(guide), &g["out.union"]) > 10.0 * F32_TOL, "the mode token matters");
}

/// With XLabs' IP-Adapter (make_controlnet_ip_fixtures.py:
/// `FluxControlNetPipeline` + `load_ip_adapter`): the adapter's term in
/// Flux's blocks, none in the ControlNet's.
#[test]
fn controlnet_with_xlabs_ip_adapter_matches_diffusers() {
    let (g, r, c) = (tensors("controlnet/ip-golden.safetensors"), json("controlnet/reference.json"), case());
    let model = tiny_flux("flux/transformer");
    let hook = xlabs_photo_hook(&model.cfg, json("controlnet/ip-reference.json")["scale"].as_f64().unwrap());
    let hooks: [&dyn ipaflux_core::flux::AttentionHook; 1] = [&hook];
    let canny = net("controlnet/canny");
    let rc = &r["canny"];
    let guide = Guide { control: &[control_input(&canny, &c.cond, rc)], ..Guide::prompt(&c.prompt) };
    let (ids, sigmas) = (c.run.ids(), c.run.sigmas());
    let out = sampler::euler(&model, Start::Noise(&c.noise), &ids, guide, &sigmas, Hooks::new(&hooks), &mut |_| {});
    assert_close("Canny ControlNet with XLabs' IP-Adapter", &out.unwrap(), &g["out"], F32_TOL);
}

/// XLabs' kind (a hint block on the control image's pixels, residuals fed to
/// Flux's double blocks in turn), in diffusers' layout and in XLabs' own
/// (BFL block names, `input_hint_block.0..14`, `pos_embed_input`): the same
/// net, so both match `FluxControlNetPipeline`'s golden.
#[test]
fn xlabs_controlnets_match_diffusers_in_both_layouts() {
    let (g, r, c) = (tensors("controlnet/golden.safetensors"), json("controlnet/reference.json"), case());
    let control = fixture_image("control/control.png");
    let pixels = ipaflux::generate::control_pixels(&control, (c.run.width, c.run.height), &Device::Cpu).unwrap();
    assert_close("XLabs control pixels", &pixels, &g["pixels"], F32_TOL);
    let model = tiny_flux("flux/transformer");
    let (ids, rx) = (c.run.ids(), &r["xlabs"]);
    let scale = rx["scale"].as_f64().unwrap();
    let (x, sigma) = (&g["xlabs.x"], g["xlabs.sigma"].to_vec1::<f32>().unwrap()[0]);
    for layout in ["controlnet/xlabs", "controlnet/xlabs-original.safetensors"] {
        let xlabs = net(layout);
        assert!(xlabs.takes_pixels(), "{layout}");
        let res = xlabs.forward(x, &ids, &pixels, None, &c.prompt, sigma.into(), scale).unwrap();
        assert!(res.repeat && res.single.is_empty(), "{layout}");
        for (i, t) in res.double.iter().enumerate() {
            assert_close(&format!("{layout} residual {i}"), t, &g[&format!("xlabs.double.{i}")], F32_TOL);
        }
        let guide = Guide { control: &[control_input(&xlabs, &pixels, rx)], ..Guide::prompt(&c.prompt) };
        let out =
            sampler::euler(&model, Start::Noise(&c.noise), &ids, guide, &c.run.sigmas(), Hooks::none(), &mut |_| {});
        assert_close(&format!("{layout}, sampled"), &out.unwrap(), &g["out.xlabs"], F32_TOL);
        // Latents where it wants pixels: refused.
        assert!(xlabs.forward(x, &ids, &c.cond, None, &c.prompt, sigma.into(), scale).is_err());
    }
}

/// The `i`th entry of a per-net list in multi-reference.json as one net's
/// entry, as [`control_input`] reads it.
fn nth(r: &serde_json::Value, i: usize) -> serde_json::Value {
    let obj = r.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v[i].clone()));
    serde_json::Value::Object(obj.collect())
}

/// Several ControlNets at once (diffusers' `FluxMultiControlNetModel`): two
/// nets of one size, each on its own image with its own scale and window,
/// and one Union net twice, in two modes. Their residuals add up.
#[test]
fn several_controlnets_match_diffusers_multi() {
    let (g, r, c) = (tensors("controlnet/multi-golden.safetensors"), json("controlnet/multi-reference.json"), case());
    let init = fixture_image("img2img/init.png");
    let cond1 = control_latents(&tiny_vae_encoder(), &init, (c.run.width, c.run.height), &Device::Cpu).unwrap();
    assert_close("control latents 0", &c.cond, &g["cond.0"], F32_TOL);
    assert_close("control latents 1", &cond1, &g["cond.1"], F32_TOL);
    let model = tiny_flux("flux/transformer");
    let ids = c.run.ids();
    let sample = |control: &[ControlInput<'_>]| {
        let guide = Guide { control, ..Guide::prompt(&c.prompt) };
        sampler::euler(&model, Start::Noise(&c.noise), &ids, guide, &c.run.sigmas(), Hooks::none(), &mut |_| {})
            .unwrap()
    };

    let (canny, depth) = (net("controlnet/canny"), net("controlnet/depth"));
    let pair =
        [control_input(&canny, &c.cond, &nth(&r["pair"], 0)), control_input(&depth, &cond1, &nth(&r["pair"], 1))];
    let out = sample(&pair);
    assert_close("two ControlNets", &out, &g["out.pair"], F32_TOL);
    // Each alone is far off: both nets' residuals are in the golden.
    for one in &pair {
        assert!(rel_max_err(&sample(std::slice::from_ref(one)), &g["out.pair"]) > 10.0 * F32_TOL);
    }
    // The order of the nets does not matter (their residuals add up).
    assert_close("two ControlNets, swapped", &sample(&[pair[1], pair[0]]), &out, F32_TOL);

    let union = net("controlnet/union");
    let ru = &r["union"];
    let twice = [control_input(&union, &c.cond, &nth(ru, 0)), control_input(&union, &cond1, &nth(ru, 1))];
    assert_close("one Union ControlNet in two modes", &sample(&twice), &g["out.union"], F32_TOL);
    let same_mode = [twice[0], ControlInput { mode: twice[0].mode, ..twice[1] }];
    assert!(rel_max_err(&sample(&same_mode), &g["out.union"]) > 10.0 * F32_TOL, "each input's mode matters");
}

/// A ControlNet whose blocks stream (as generate runs one that does not fit
/// beside Flux): the same residuals as resident, to the bit, and diffusers'.
#[test]
fn a_streamed_controlnet_gives_the_residuals_of_a_resident_one() {
    let (g, c) = (tensors("controlnet/golden.safetensors"), case());
    let ids = c.run.ids();
    for (name, mode, streamed) in [
        ("canny", None, vec![BlockId::Double(0), BlockId::Single(1)]),
        ("union", Some(2), vec![BlockId::Double(0), BlockId::Double(1)]),
    ] {
        let files = ipaflux::load::load_controlnet(&fixture(&format!("controlnet/{name}"))).unwrap();
        let axes = files.axes_dim.clone();
        let resident =
            FluxControlNet::from_store(files.weights.clone(), axes.clone(), DType::F32, &Device::Cpu).unwrap();
        let (mut net, kept) =
            FluxControlNet::from_store_streamed(files.weights, axes, DType::F32, &Device::Cpu, &streamed).unwrap();
        // What it holds back is the streamed blocks' tensors, and only those.
        assert!(!kept.is_empty() && kept.keys().all(|k| streamed.iter().any(|b| b.owns(k))), "{name}");
        assert!(streamed.iter().all(|b| kept.keys().any(|k| b.owns(k))), "{name}");
        // Unset, a streamed block is an error, not a silent skip.
        let (x, sigma) =
            (&g[&format!("{name}.x")], f64::from(g[&format!("{name}.sigma")].to_vec1::<f32>().unwrap()[0]));
        assert!(net.forward(x, &ids, &c.cond, mode, &c.prompt, sigma, 0.5).is_err(), "{name}");
        net.set_block_source(Arc::new(HostBlocks::new(kept, &streamed, &Device::Cpu, &Device::Cpu).unwrap()));
        let a = net.forward(x, &ids, &c.cond, mode, &c.prompt, sigma, 0.5).unwrap();
        let b = resident.forward(x, &ids, &c.cond, mode, &c.prompt, sigma, 0.5).unwrap();
        for (s, r) in a.double.iter().chain(&a.single).zip(b.double.iter().chain(&b.single)) {
            assert_eq!(rel_max_err(s, r), 0.0, "{name}: streamed differs");
        }
        assert_eq!((a.double.len(), a.single.len()), (b.double.len(), b.single.len()));
    }
}
