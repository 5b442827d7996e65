//! Depth Anything against transformers (tests/reference/make_depth_fixtures.py):
//! `DPTImageProcessor`'s pixel values (PIL backend), the model's
//! `predicted_depth`, `post_process_depth_estimation` at the image's size
//! and the 8-bit map ComfyUI's preprocessor makes of it, for a relative and a
//! metric tiny model and three images (landscape JPEG, portrait PNG with
//! alpha, WebP). Tolerances: pixels 1e-6; the bicubic resize alone 1e-5; depth
//! f32 relative max error ≤ 1e-4;
//! the map within 1 level (truncation of values within rounding of an integer).
//!
//! The original V2 repository's checkpoints and pipeline against that
//! repository's own code (tests/reference/make_depth_original_fixtures.py):
//! a relative `.pth` and a metric f16 safetensors conversion, three images
//! (one square at 518, where DINOv2 keeps its trained positions), with the
//! same tolerances.

use ipaflux::depth::{load_depth, load_depth_dir, DepthEstimator};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::depth_anything::{
    depth_map_u8, original, pixel_values, resize_bicubic, DepthKind, DepthPipeline, DepthPreprocessConfig,
};
use ipaflux_tests::*;

/// The 8-bit map against the golden's: no level off by more than 1, ≥ 99 % equal.
fn assert_map(what: &str, map: &[u8], want: &Tensor) {
    let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(map.len(), want.len(), "{what}");
    let off = map.iter().zip(&want).filter(|(&a, &b)| (f32::from(a) - b).abs() > 1.0).count();
    let exact = map.iter().zip(&want).filter(|(&a, &b)| f32::from(a) == b).count();
    assert_eq!(off, 0, "{what}: {off} levels differ by more than 1");
    assert!(exact * 100 >= map.len() * 99, "{what}: only {exact} of {} levels equal", map.len());
}

#[test]
fn depth_anything_matches_transformers() {
    let g = tensors("depth/golden.safetensors");
    let r = json("depth/reference.json");
    for model in ["model", "metric"] {
        let files = load_depth_dir(&fixture(&format!("depth/{model}"))).unwrap();
        let est = DepthEstimator::new(&files, DType::F32, &Device::Cpu).unwrap();
        for (image, rel) in r["images"].as_object().unwrap() {
            let key = |k: &str| format!("{model}.{image}.{k}");
            let img = fixture_image(rel.as_str().unwrap());
            let pixels = pixel_values(&img, &files.preprocess).unwrap();
            assert_close(&key("pixel_values"), &pixels, &g[&key("pixel_values")], 1e-6);
            let bytes = std::fs::read(fixture(rel.as_str().unwrap())).unwrap();
            let (depth, w, h) = est.depth(&bytes, image).unwrap();
            assert_eq!((w, h), (img.width, img.height));
            let depth = Tensor::from_vec(depth, (h, w), &Device::Cpu).unwrap();
            assert_close(&key("depth"), &depth, &g[&key("depth")], F32_TOL);
            let (map, _, _) = est.depth_map(&bytes, image).unwrap();
            // A metric model's map is turned over (near bright), as ComfyUI's node does.
            let want = match files.config.kind {
                DepthKind::Relative => g[&key("map")].clone(),
                DepthKind::Metric { .. } => (255.0 - &g[&key("map")]).unwrap(),
            };
            assert_map(&key("map"), &map, &want);
        }
    }
}

/// An original V2 checkpoint through the original pipeline, against the
/// repository's `image2tensor`, `forward`, `infer_image` and ComfyUI's map.
#[test]
fn original_depth_anything_v2_matches_its_repository() {
    let g = tensors("depth/original/golden.safetensors");
    let r = json("depth/original/reference.json");
    for (model, file) in r["models"].as_object().unwrap() {
        let mut files = load_depth(&fixture(&format!("depth/original/{}", file.as_str().unwrap()))).unwrap();
        assert_eq!(files.preprocess, DepthPreprocessConfig::original(518), "ComfyUI's input size");
        let kind = if model == "metric" { DepthKind::Metric { max_depth: 20.0 } } else { DepthKind::Relative };
        assert_eq!(files.config.kind, kind, "told by the file's name");
        for (image, spec) in r["images"].as_object().unwrap() {
            let key = |k: &str| format!("{model}.{image}.{k}");
            files.preprocess = DepthPreprocessConfig::original(spec["input_size"].as_u64().unwrap() as usize);
            let est = DepthEstimator::new(&files, DType::F32, &Device::Cpu).unwrap();
            let rel = spec["path"].as_str().unwrap();
            let img = fixture_image(rel);
            if spec["raw_outputs"].as_bool().unwrap() {
                let pixels = pixel_values(&img, &files.preprocess).unwrap();
                assert_close(&format!("{image}.pixel_values"), &pixels, &g[&format!("{image}.pixel_values")], 1e-6);
                let raw = est.model_output(&pixels).unwrap();
                assert_close(&key("predicted_depth"), &raw, &g[&key("predicted_depth")], F32_TOL);
            }
            let bytes = std::fs::read(fixture(rel)).unwrap();
            let (depth, w, h) = est.depth(&bytes, image).unwrap();
            let depth = Tensor::from_vec(depth, (h, w), &Device::Cpu).unwrap();
            assert_close(&key("depth"), &depth, &g[&key("depth")], F32_TOL);
            assert_map(&key("map"), &est.depth_map(&bytes, image).unwrap().0, &g[&key("map")]);
        }
    }
}

/// What the weights cannot say is read from the name, and refused when the
/// name does not say it; a file that is not an original checkpoint is named.
#[test]
fn original_checkpoints_are_told_by_their_names() {
    let path = fixture("depth/original/depth_anything_v2_tiny.pth");
    let store = || ipaflux::load::load_store(&path).unwrap();
    assert!(original::is_original(&store()));
    let e = original::convert(store(), "depth_anything_vits14.pth").unwrap_err().to_string();
    assert!(e.contains("not named as a Depth Anything V2 checkpoint") && e.contains("-hf"), "{e}");
    let (cfg, _) = original::convert(store(), "depth_anything_v2_metric_vkitti_vitl.pth").unwrap();
    assert_eq!(cfg.kind, DepthKind::Metric { max_depth: 80.0 });
    let (cfg, weights) = original::convert(store(), "Depth_Anything_V2_vits.pth").unwrap();
    assert_eq!((cfg.kind, cfg.backbone.out_indices.clone()), (DepthKind::Relative, vec![3, 6, 9, 12]));
    assert_eq!(cfg.backbone.num_attention_heads, 1, "DINOv2's heads are 64 wide");
    assert!(weights.contains("backbone.encoder.layer.11.attention.attention.value.bias"));
    assert_eq!(weights.read_bytes(), 0, "the split query, key and value are read when used, not at load");
    let e = load_depth(&fixture("depth/model/model.safetensors")).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("not an original Depth Anything V2 checkpoint"), "{e}");
    assert_eq!(DepthPreprocessConfig::depth_anything().pipeline, DepthPipeline::Transformers);
}

/// The model's own output (before resizing) and the bicubic post-process on
/// the golden's output, apart: a failure says which of the two is wrong.
#[test]
fn depth_anything_parts_match_transformers() {
    let g = tensors("depth/golden.safetensors");
    let files = load_depth_dir(&fixture("depth/model")).unwrap();
    let est = DepthEstimator::new(&files, DType::F32, &Device::Cpu).unwrap();
    let raw = &g["model.photo.predicted_depth"];
    let (_, h, w) = raw.dims3().unwrap();
    let img = fixture_image("images/photo.jpg");
    let plane = raw.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let resized = resize_bicubic(&plane, 1, (h, w), (img.height, img.width)).unwrap();
    let resized = Tensor::from_vec(resized, (img.height, img.width), &Device::Cpu).unwrap();
    // f64 here, f32 in PyTorch: rounding apart.
    assert_close("bicubic post-process", &resized, &g["model.photo.depth"], 1e-5);
    let ours = est.model_output(&pixel_values(&img, &files.preprocess).unwrap()).unwrap();
    assert_close("predicted_depth", &ours, raw, F32_TOL);
    // The committed PNG is the same map.
    let png =
        ipaflux_core::preprocess::decode_rgb(&std::fs::read(fixture("depth/model.photo.png")).unwrap(), "png").unwrap();
    let want = g["model.photo.map"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(png.data.chunks_exact(3).zip(&want).all(|(p, &m)| f32::from(p[0]) == m));
    assert_eq!(depth_map_u8(&[0.0, 1.0], DepthKind::Relative), vec![0, 255]);
}

/// A checkpoint missing a tensor is refused by name, before anything runs.
#[test]
fn depth_checkpoint_problems_are_named() {
    let mut files = load_depth_dir(&fixture("depth/model")).unwrap();
    files.weights = files.weights.filter_rename(|n| (n != "head.conv3.bias").then(|| n.to_string()));
    let e = DepthEstimator::new(&files, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing tensor `head.conv3.bias`"), "{e}");
}
