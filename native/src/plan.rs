//! `ipaflux plan`: runs the memory registry through a whole job on a budgeted
//! device and prints the timeline, each model's residency per stage and a summary.

use std::fmt::Write as _;
use std::path::Path;

use ipaflux_core::registry::scenario::{PlanReport, Scenario, BUILTIN};
use ipaflux_core::registry::Bytes;

use crate::{Error, Result};

/// A built-in scenario by name, or a scenario JSON file.
pub fn load_scenario(arg: &str) -> Result<Scenario> {
    if BUILTIN.iter().any(|(name, _)| *name == arg) {
        return Ok(Scenario::builtin(arg)?);
    }
    let path = Path::new(arg);
    if !path.exists() {
        let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
        return Err(Error::Io {
            path: path.to_path_buf(),
            reason: format!("no such file, and not a built-in scenario ({})", names.join(", ")),
        });
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Io { path: path.to_path_buf(), reason: format!("cannot read the scenario: {e}") })?;
    Ok(Scenario::from_json(&path.display().to_string(), &text)?)
}

fn gib(bytes: u64) -> String {
    if bytes == 0 {
        "-".to_string()
    } else {
        format!("{:.2}", bytes as f64 / (1u64 << 30) as f64)
    }
}

/// The human-readable report.
pub fn render(report: &PlanReport) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan: {} on {} with {} (usable {} after reserve {} and safety margin); state {}, policy {}, \
         offload_preprocessing {}, {} steps",
        s.scenario,
        s.device,
        Bytes(s.budget_bytes),
        Bytes(s.usable_bytes),
        Bytes(s.reserve_bytes),
        s.state,
        s.policy,
        if s.offload_preprocessing { "on" } else { "off" },
        s.steps
    );
    out.push_str(&timeline_table(&report.events));
    render_residency(&mut out, report);
    let _ = writeln!(out, "\nsummary");
    let _ =
        writeln!(out, "  peak on {}      {} of {} budget", s.device, Bytes(s.peak_device_bytes), Bytes(s.budget_bytes));
    let _ = writeln!(out, "  host -> device     {}", Bytes(s.h2d_bytes));
    let _ = writeln!(out, "  device -> host     {}", Bytes(s.d2h_bytes));
    let _ = writeln!(out, "  left after cleanup {}", Bytes(s.leaked_bytes));
    out
}

fn render_residency(out: &mut String, report: &PlanReport) {
    let _ = writeln!(out, "\nresidency on the device after each stage (GiB loaded; size at right)");
    let _ = write!(out, "  {:<15}", "model");
    for st in &report.stages {
        let _ = write!(out, " {:>13}", st.stage);
    }
    let _ = writeln!(out, " {:>9}", "size");
    let models = report.stages.first().map(|s| s.resident.clone()).unwrap_or_default();
    for m in &models {
        let _ = write!(out, "  {:<15}", m.model);
        for st in &report.stages {
            let loaded = st.resident.iter().find(|r| r.model == m.model).map_or(0, |r| r.loaded_bytes);
            let mark = if loaded > 0 && loaded < m.size_bytes { "~" } else { "" };
            let _ = write!(out, " {:>13}", format!("{mark}{}", gib(loaded)));
        }
        let _ = writeln!(out, " {:>9}", gib(m.size_bytes));
    }
    let _ = write!(out, "  {:<15}", "stage peak");
    for st in &report.stages {
        let _ = write!(out, " {:>13}", gib(st.peak_bytes));
    }
    let _ = writeln!(out);
    let _ = write!(out, "  {:<15}", "streamed/use");
    for st in &report.stages {
        let _ = write!(out, " {:>13}", gib(st.streamed_bytes_per_use));
    }
    let _ = writeln!(out, "\n  (~ partially loaded; - nothing on the device)");
}

/// The registry's events as a table: stage, op, model, bytes, device, reason.
pub fn timeline_table(events: &[ipaflux_core::registry::Event]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\ntimeline");
    let _ = writeln!(out, "  {:<13} {:<13} {:<17} {:>11} {:<7} reason", "stage", "op", "model", "bytes", "device");
    for e in events {
        let _ = writeln!(
            out,
            "  {:<13} {:<13} {:<17} {:>11} {:<7} {}",
            e.stage,
            e.op.name(),
            e.model,
            Bytes(e.bytes).to_string(),
            e.device,
            e.reason
        );
    }
    out
}
