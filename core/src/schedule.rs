//! Flow-matching schedules for FLUX.1 and the IP-Adapter's sigma window.
//!
//! - [`flux_schedule`]: BFL's `get_schedule` (flux/sampling.py): `steps + 1`
//!   timesteps from 1 to 0, time-shifted by `mu`, which is linear in the image
//!   token count (0.5 at 256 tokens, 1.15 at 4096); schnell uses no shift.
//! - [`percent_to_sigma`]: ComfyUI's `ModelSamplingFlux.percent_to_sigma`, which
//!   the IP-Adapter nodes use to turn start/end percent into a sigma window.
//! - [`IpWindow`] and [`WeightRamp`]: when the adapter is active and with which
//!   weight, counted per sampler step.
//!
//! Computed in f32 where the references compute in f32 (the torch tensors of
//! `get_schedule`), so values match them to the last bit or two.

/// `e^mu / (e^mu + (1/t − 1)^sigma)`: the Flux time shift.
pub fn time_shift(mu: f64, sigma: f64, t: f64) -> f64 {
    let e = mu.exp();
    e / (e + (1.0 / t - 1.0).powf(sigma))
}

/// The shift `mu` for `image_tokens` (BFL: linear through (256, base) and (4096, max)).
pub fn flux_mu(image_tokens: usize, base_shift: f64, max_shift: f64) -> f64 {
    let slope = (max_shift - base_shift) / (4096.0 - 256.0);
    slope * image_tokens as f64 + (base_shift - slope * 256.0)
}

/// Shift settings of [`flux_schedule`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shift {
    /// FLUX.1-dev: `mu` from the token count between these two values.
    Resolution { base: f64, max: f64 },
    /// FLUX.1-schnell: plain linear timesteps.
    None,
}

impl Shift {
    /// FLUX.1-dev's values (0.5, 1.15).
    pub const DEV: Self = Self::Resolution { base: 0.5, max: 1.15 };
}

/// The `steps + 1` timesteps (= sigmas) from 1 to 0, as BFL's `get_schedule`.
pub fn flux_schedule(steps: usize, image_tokens: usize, shift: Shift) -> Vec<f32> {
    // exp(mu) is a Python float in the reference; the rest is f32 tensor arithmetic.
    let exp_mu = match shift {
        Shift::Resolution { base, max } => Some(flux_mu(image_tokens, base, max).exp() as f32),
        Shift::None => None,
    };
    (0..=steps)
        .map(|i| {
            // torch.linspace(1, 0, steps + 1) in f32.
            let t = if steps == 0 { 1.0 } else { linspace_f32(1.0, 0.0, steps + 1, i) };
            match exp_mu {
                Some(e) => e / (e + (1.0 / t - 1.0)),
                None => t,
            }
        })
        .collect()
}

/// `torch.linspace(start, end, n)[i]` in f32: steps from the start for the first
/// half and from the end for the second, as torch's CPU kernel does.
fn linspace_f32(start: f32, end: f32, n: usize, i: usize) -> f32 {
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    if i < halfway {
        start + step * i as f32
    } else {
        end - step * (n - 1 - i) as f32
    }
}

/// ComfyUI's `percent_to_sigma` for Flux models: 0 % → σ 1, 100 % → σ 0, and
/// in between the time-shifted `1 − percent` with `mu = shift` (1.15 by default).
pub fn percent_to_sigma(percent: f64, shift: f64) -> f64 {
    if percent <= 0.0 {
        1.0
    } else if percent >= 1.0 {
        0.0
    } else {
        time_shift(shift, 1.0, 1.0 - percent)
    }
}

/// ComfyUI's default Flux shift for `percent_to_sigma`.
pub const COMFY_FLUX_SHIFT: f64 = 1.15;

/// The sigmas for which the IP-Adapter is active: `end ≤ σ ≤ start`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IpWindow {
    pub sigma_start: f64,
    pub sigma_end: f64,
}

impl IpWindow {
    /// From start/end percent as the ComfyUI nodes take them.
    pub fn from_percent(start_percent: f64, end_percent: f64, shift: f64) -> Self {
        Self { sigma_start: percent_to_sigma(start_percent, shift), sigma_end: percent_to_sigma(end_percent, shift) }
    }

    pub fn contains(&self, sigma: f64) -> bool {
        self.sigma_end <= sigma && sigma <= self.sigma_start
    }
}

/// The Advanced node's linear weight ramp: `start` at step 0 to `end` at the
/// last step, counted per sampler step (not per distinct sigma).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightRamp {
    pub start: f64,
    pub end: f64,
    pub steps: usize,
}

impl WeightRamp {
    pub fn weight(&self, step: usize) -> f64 {
        if self.steps <= 1 {
            return self.start;
        }
        let f = step.min(self.steps - 1) as f64 / (self.steps - 1) as f64;
        self.start + (self.end - self.start) * f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schnell_is_linear_and_dev_is_shifted_toward_noise() {
        let s = flux_schedule(4, 4096, Shift::None);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        let d = flux_schedule(4, 4096, Shift::DEV);
        assert_eq!((d[0], d[4]), (1.0, 0.0));
        assert!(d[1..4].iter().zip(&s[1..4]).all(|(a, b)| a > b), "{d:?}");
    }

    #[test]
    fn percent_window_edges() {
        assert_eq!(percent_to_sigma(0.0, COMFY_FLUX_SHIFT), 1.0);
        assert_eq!(percent_to_sigma(1.0, COMFY_FLUX_SHIFT), 0.0);
        let w = IpWindow::from_percent(0.0, 1.0, COMFY_FLUX_SHIFT);
        assert!(w.contains(1.0) && w.contains(0.0) && w.contains(0.5));
        let empty = IpWindow::from_percent(0.6, 0.4, COMFY_FLUX_SHIFT);
        assert!(!(0..=100).any(|i| empty.contains(f64::from(i) / 100.0)));
    }

    #[test]
    fn ramp_counts_steps() {
        let r = WeightRamp { start: 1.0, end: 0.0, steps: 5 };
        let w: Vec<f64> = (0..6).map(|i| r.weight(i)).collect();
        assert_eq!(w, vec![1.0, 0.75, 0.5, 0.25, 0.0, 0.0]);
        assert_eq!(WeightRamp { start: 0.7, end: 0.0, steps: 1 }.weight(0), 0.7);
    }
}
