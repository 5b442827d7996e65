//! Our JPEG decoder against Pillow's decode (libjpeg-turbo, default settings) of
//! the fixtures made by tests/reference/make_jpeg_fixtures.py. Tolerance: none —
//! every sample must be identical.

use ipaflux_core::candle_core::{safetensors, Device};
use ipaflux_tests::fixture;

#[test]
fn decodes_byte_identical_to_libjpeg_turbo() {
    let reference = safetensors::load(fixture("jpeg/decoded.safetensors"), &Device::Cpu).unwrap();
    assert!(reference.len() >= 14);
    let mut failures = Vec::new();
    for (name, want) in &reference {
        let bytes = std::fs::read(fixture(&format!("jpeg/{name}.jpg"))).unwrap();
        let got = ipaflux_core::jpeg::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let (h, w, _) = want.dims3().unwrap();
        assert_eq!((got.height, got.width), (h, w), "{name}: size");
        let rgb: Vec<u8> =
            if got.channels == 1 { got.data.iter().flat_map(|&v| [v, v, v]).collect() } else { got.data };
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diffs: Vec<i32> =
            rgb.iter().zip(&want).map(|(&a, &b)| (i32::from(a) - i32::from(b)).abs()).filter(|&d| d > 0).collect();
        eprintln!("{name}: {} of {} samples differ, max {}", diffs.len(), want.len(), diffs.iter().max().unwrap_or(&0));
        if !diffs.is_empty() {
            failures.push(name.clone());
        }
    }
    assert!(failures.is_empty(), "not byte-identical: {failures:?}");
}

/// Corrupted JPEGs (random byte flips, truncations) are errors or images, never panics.
#[test]
fn corrupt_jpegs_never_panic() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    let mut runs = 0;
    for entry in std::fs::read_dir(fixture("jpeg")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "jpg") {
            continue;
        }
        let original = std::fs::read(&path).unwrap();
        for i in 0..300 {
            let mut bytes = original.clone();
            if i % 10 == 0 {
                bytes.truncate((next() as usize) % bytes.len());
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = (next() as usize) % bytes.len();
                    bytes[at] = next() as u8;
                }
            }
            runs += 1;
            if ipaflux_core::jpeg::decode(&bytes).is_err() {
                errors += 1;
            }
        }
    }
    eprintln!("{runs} corrupted inputs, {errors} rejected, the rest decoded");
    assert!(errors > 0 && runs >= 4000);
}

/// Extraneous bytes between segments (some encoders write them; libjpeg warns and goes on) change nothing.
#[test]
fn extraneous_bytes_before_a_marker_are_skipped() {
    let bytes = std::fs::read(fixture("jpeg/q75_444.jpg")).unwrap();
    let clean = ipaflux_core::jpeg::decode(&bytes).unwrap();
    // Insert junk right after the APP0 (JFIF) segment, before the next marker.
    let app0_len = usize::from(u16::from_be_bytes([bytes[4], bytes[5]]));
    let at = 4 + app0_len;
    let mut junk = bytes[..at].to_vec();
    junk.extend_from_slice(&[0x00, 0x12, 0xFF, 0xFF]);
    junk.extend_from_slice(&bytes[at..]);
    assert_eq!(ipaflux_core::jpeg::decode(&junk).unwrap(), clean);
}
