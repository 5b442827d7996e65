//! Canny edges against OpenCV's `cv2.Canny` (tests/reference/make_canny_fixtures.py):
//! three fixture images (a JPEG photo, a PNG, a palette PNG) at four
//! threshold pairs, one given high-to-low. Tolerance: none — every pixel.

use ipaflux_core::canny::canny;
use ipaflux_tests::*;

#[test]
fn canny_matches_opencv_pixel_for_pixel() {
    let r = json("canny/reference.json");
    let cases = r["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 12);
    for c in cases {
        let image = fixture_image(c["image"].as_str().unwrap());
        let (low, high) = (c["low"].as_f64().unwrap(), c["high"].as_f64().unwrap());
        let want = fixture_image(&format!("canny/{}", c["edges"].as_str().unwrap()));
        let want: Vec<u8> = want.data.chunks_exact(3).map(|p| p[0]).collect();
        let ours = canny(&image, low, high).unwrap();
        let differ = ours.iter().zip(&want).filter(|(a, b)| a != b).count();
        let edges = ours.iter().filter(|&&v| v == 255).count();
        assert_eq!(differ, 0, "{c}: {differ} pixels differ from OpenCV's ({edges} edges vs {})", c["count"]);
        assert_eq!(edges as u64, c["count"].as_u64().unwrap());
        eprintln!("Canny {} at {low}/{high}: {edges} edge pixels, identical to OpenCV", c["image"]);
    }
}
