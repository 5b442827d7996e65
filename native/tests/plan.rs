#![allow(clippy::unwrap_used)]
//! `ipaflux plan`: the registry run through a whole job, as text and as JSON.

use std::process::{Command, Output};

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ipaflux")).arg("plan").args(args).output().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = plan(&all);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_fails(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure: {err}");
    assert_ne!(out.status.code(), Some(101), "panicked: {err}");
    assert!(err.contains(needle), "stderr lacks `{needle}`: {err}");
}

#[test]
fn json_has_events_and_summary_within_budget() {
    for vram in ["80GiB", "24GiB", "12GiB"] {
        let v = json(&["--vram", vram, "--scenario", "flux-dev-ipadapter"]);
        let summary = &v["summary"];
        for key in ["peak_device_bytes", "budget_bytes", "h2d_bytes", "d2h_bytes"] {
            assert!(summary[key].is_u64(), "{vram}: summary.{key} missing");
        }
        assert!(summary["peak_device_bytes"].as_u64() <= summary["budget_bytes"].as_u64());
        let events = v["events"].as_array().unwrap();
        assert!(!events.is_empty());
        for e in events {
            for key in ["stage", "op", "model", "bytes", "device", "reason"] {
                assert!(!e[key].is_null(), "{vram}: event lacks {key}: {e}");
            }
        }
        let streams = events.iter().any(|e| e["op"] == "stream");
        assert_eq!(streams, vram != "80GiB", "{vram}: streaming only when Flux does not fit");
    }
}

#[test]
fn options_change_the_plan() {
    let base = json(&["--vram", "24GiB"]);
    let reserved = json(&["--vram", "24GiB", "--reserve", "2GiB"]);
    assert!(reserved["summary"]["peak_device_bytes"].as_u64() < base["summary"]["peak_device_bytes"].as_u64());
    let kept = json(&["--vram", "80GiB", "--offload-preprocessing", "off"]);
    let offloaded = json(&["--vram", "80GiB", "--offload-preprocessing", "on"]);
    let offloads =
        |v: &serde_json::Value| v["events"].as_array().unwrap().iter().filter(|e| e["op"] == "offload").count();
    assert_eq!(offloads(&kept), 0);
    assert!(offloads(&offloaded) >= 3);
    let flux_loaded = |v: &serde_json::Value| -> u64 {
        let events = v["events"].as_array().unwrap();
        events
            .iter()
            .filter(|e| e["model"] == "flux-dev" && e["op"] == "partial_load")
            .map(|e| e["bytes"].as_u64().unwrap())
            .sum()
    };
    let low = json(&["--vram", "24GiB", "--state", "low"]);
    assert!(flux_loaded(&low) > 0 && flux_loaded(&low) * 10 < flux_loaded(&base) * 6, "low keeps about half");
    // No VRAM: only Flux's base unit (embedders and final layer, which every block needs) is resident.
    let none = json(&["--vram", "24GiB", "--state", "no"]);
    assert_eq!(flux_loaded(&none), 125_433_344);
    let steps = |v: &serde_json::Value| v["summary"]["h2d_bytes"].as_u64().unwrap();
    assert!(steps(&json(&["--vram", "12GiB", "--steps", "30"])) > steps(&json(&["--vram", "12GiB", "--steps", "4"])));
}

#[test]
fn text_report_has_timeline_residency_and_summary() {
    let out = plan(&["--vram", "24GiB"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in ["timeline", "partial_load", "residency", "~", "summary", "host -> device", "left after cleanup 0 B"]
    {
        assert!(text.contains(needle), "lacks `{needle}`:\n{text}");
    }
}

#[test]
fn a_scenario_file_runs() {
    let path = std::env::temp_dir().join(format!("ipaflux-plan-{}.json", std::process::id()));
    std::fs::write(
        &path,
        r#"{"name": "sdxl-ish", "device": "cuda:0",
            "models": [{"name": "unet", "role": "diffusion", "size": "5GB", "units": 10},
                       {"name": "te", "role": "text_encoder", "size": "1.6GB"}],
            "stages": [{"name": "text", "models": ["te"]},
                       {"name": "sample", "models": ["unet"], "working": "1GiB", "repeat": "steps"}]}"#,
    )
    .unwrap();
    let v = json(&["--vram", "4GiB", "--scenario", path.to_str().unwrap()]);
    assert_eq!(v["summary"]["scenario"], "sdxl-ish");
    assert!(v["events"].as_array().unwrap().iter().any(|e| e["op"] == "stream" && e["model"] == "unet"));
}

#[test]
fn bad_input_is_a_clear_error() {
    assert_fails(&plan(&["--vram", "lots"]), "not a size");
    assert_fails(&plan(&["--vram", "24GiB", "--scenario", "/nonexistent/x.json"]), "not a built-in scenario");
    assert_fails(&plan(&["--vram", "24GiB", "--state", "medium"]), "unknown VRAM state");
    assert_fails(&plan(&["--vram", "24GiB", "--state", "high"]), "--vram-state normal");
    assert_fails(&plan(&["--vram", "1GiB"]), "cannot run it");
    let path = std::env::temp_dir().join(format!("ipaflux-plan-bad-{}.json", std::process::id()));
    std::fs::write(&path, r#"{"name": "x", "models": [], "stages": [{"name": "s", "models": ["ghost"]}]}"#).unwrap();
    assert_fails(&plan(&["--vram", "24GiB", "--scenario", path.to_str().unwrap()]), "unknown model `ghost`");
}
