//! Depth Anything against transformers (tests/reference/make_depth_fixtures.py):
//! `DPTImageProcessor`'s pixel values (PIL backend), the model's
//! `predicted_depth`, `post_process_depth_estimation` at the image's size
//! and the 8-bit map ComfyUI's preprocessor makes of it, for a relative and a
//! metric tiny model and three images (landscape JPEG, portrait PNG with
//! alpha, WebP). Tolerances: pixels 1e-6; the bicubic resize alone 1e-5; depth
//! f32 relative max error ≤ 1e-4;
//! the map within 1 level (truncation of values within rounding of an integer).

use ipaflux::depth::{load_depth_dir, DepthEstimator};
use ipaflux_core::candle_core::{DType, Device, Tensor};
use ipaflux_core::depth_anything::{depth_map_u8, pixel_values, resize_bicubic};
use ipaflux_tests::*;

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
            let want = g[&key("map")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let off = map.iter().zip(&want).filter(|(&a, &b)| (f32::from(a) - b).abs() > 1.0).count();
            let exact = map.iter().zip(&want).filter(|(&a, &b)| f32::from(a) == b).count();
            assert_eq!(off, 0, "{}: {off} levels differ by more than 1", key("map"));
            assert!(exact * 100 >= map.len() * 99, "{}: only {exact} of {} levels equal", key("map"), map.len());
        }
    }
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
    assert_eq!(depth_map_u8(&[0.0, 1.0]), vec![0, 255]);
}

/// A checkpoint missing a tensor is refused by name, before anything runs.
#[test]
fn depth_checkpoint_problems_are_named() {
    let mut files = load_depth_dir(&fixture("depth/model")).unwrap();
    files.weights = files.weights.filter_rename(|n| (n != "head.conv3.bias").then(|| n.to_string()));
    let e = DepthEstimator::new(&files, DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("missing tensor `head.conv3.bias`"), "{e}");
}
