//! Flux schedule and IP window against BFL's get_schedule and ComfyUI's
//! percent_to_sigma (tests/reference/make_schedule_fixtures.py). Tolerance:
//! timesteps within 1 ulp of f32 (the reference computes in f32 tensors);
//! sigmas from percent within 1e-12 (both f64).

use ipaflux_core::schedule::{flux_schedule, percent_to_sigma, Shift, COMFY_FLUX_SHIFT};
use ipaflux_tests::fixture;

#[test]
fn schedules_match_bfl_get_schedule() {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(fixture("schedule.json")).unwrap()).unwrap();
    let cases = json["schedules"].as_array().unwrap();
    assert!(cases.len() >= 6);
    for case in cases {
        let steps = case["steps"].as_u64().unwrap() as usize;
        let tokens = case["tokens"].as_u64().unwrap() as usize;
        let shift = if case["shift"].as_bool().unwrap() { Shift::DEV } else { Shift::None };
        let want: Vec<f32> = case["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        let got = flux_schedule(steps, tokens, shift);
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let ulps = (g.to_bits() as i64 - w.to_bits() as i64).abs();
            assert!(ulps <= 1, "{steps} steps, {tokens} tokens, t[{i}]: {g} vs {w}");
        }
    }
    for pair in json["percent_to_sigma"].as_array().unwrap() {
        let (p, want) = (pair[0].as_f64().unwrap(), pair[1].as_f64().unwrap());
        let got = percent_to_sigma(p, COMFY_FLUX_SHIFT);
        assert!((got - want).abs() <= 1e-12, "{p}: {got} vs {want}");
    }
}
