//! Canny edge detection as OpenCV's `cv2.Canny(image, low, high)` computes it
//! (aperture 3, L1 gradient: its defaults), pixel for pixel: the edge map
//! FLUX.1 Canny is conditioned on, made the way diffusers' examples make it
//! (controlnet_aux's `CannyDetector` calls `cv2.Canny` on the RGB image).
//!
//! The algorithm follows OpenCV's `imgproc/src/canny.cpp` (read to learn its
//! exact rules; the code is ours): 3×3 Sobel derivatives with replicated
//! borders; per pixel the channel of largest `|dx| + |dy|` (the first on a
//! tie); non-maximum suppression along the gradient's sector, told by integer
//! tangent tests (tan 22.5° in 15-bit fixed point), comparing strictly on one
//! side and not on the other as OpenCV does; then hysteresis: a pixel above
//! `high` is an edge, and so is one above `low` 8-connected to an edge.
//!
//! Not done here: controlnet_aux's resizing to a detection resolution (pass
//! the image at the size wanted), OpenCV's L2 gradient and larger apertures.

use crate::error::{Error, Result};
use crate::preprocess::RgbImage;

/// tan 22.5° in 15-bit fixed point, rounded (OpenCV's `TG22`).
const TG22: i64 = 13573;
const SHIFT: u32 = 15;

/// Derivatives of one channel at one pixel.
#[derive(Clone, Copy, Default)]
struct Gradient {
    dx: i32,
    dy: i32,
    /// `|dx| + |dy|`.
    mag: i32,
}

/// The edge map of `image` (255 = edge, 0 = not), one byte per pixel; `low`
/// and `high` are swapped when given the other way round, as OpenCV does.
pub fn canny(image: &RgbImage, low: f64, high: f64) -> Result<Vec<u8>> {
    let (w, h) = (image.width, image.height);
    if image.data.len() != w * h * 3 || w == 0 || h == 0 {
        return Err(Error::Shape(format!("Canny: {} bytes for a {w}×{h} RGB image", image.data.len())));
    }
    if !(low.is_finite() && high.is_finite()) {
        return Err(Error::Unsupported(format!("Canny thresholds {low} and {high} must be numbers")));
    }
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i64, high.floor() as i64);
    let grad = gradients(image);
    let strong = suppress(&grad, w, h, low, high);
    Ok(hysteresis(strong, w, h))
}

/// Sobel derivatives (replicated borders) of the channel with the largest
/// L1 magnitude at each pixel, row-major.
fn gradients(image: &RgbImage) -> Vec<Gradient> {
    let (w, h) = (image.width, image.height);
    let px = |x: isize, y: isize, c: usize| -> i32 {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        i32::from(image.data[(y * w + x) * 3 + c])
    };
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h as isize {
        for x in 0..w as isize {
            let mut best = Gradient::default();
            for c in 0..3 {
                let dx = (px(x + 1, y - 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x + 1, y, c) - px(x - 1, y, c))
                    + (px(x + 1, y + 1, c) - px(x - 1, y + 1, c));
                let dy = (px(x - 1, y + 1, c) - px(x - 1, y - 1, c))
                    + 2 * (px(x, y + 1, c) - px(x, y - 1, c))
                    + (px(x + 1, y + 1, c) - px(x + 1, y - 1, c));
                let g = Gradient { dx, dy, mag: dx.abs() + dy.abs() };
                if c == 0 || g.mag > best.mag {
                    best = g;
                }
            }
            out.push(best);
        }
    }
    out
}

/// What non-maximum suppression leaves of a pixel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Not an edge.
    No,
    /// A local maximum above `low`: an edge if connected to a strong one.
    Weak,
    /// A local maximum above `high`.
    Strong,
}

/// Non-maximum suppression along each pixel's gradient sector; magnitudes
/// outside the image count as 0.
fn suppress(grad: &[Gradient], w: usize, h: usize, low: i64, high: i64) -> Vec<Mark> {
    let mag = |x: isize, y: isize| -> i64 {
        if x < 0 || y < 0 || x >= w as isize || y >= h as isize {
            0
        } else {
            i64::from(grad[y as usize * w + x as usize].mag)
        }
    };
    let mut marks = vec![Mark::No; w * h];
    for y in 0..h as isize {
        for x in 0..w as isize {
            let g = grad[y as usize * w + x as usize];
            let m = i64::from(g.mag);
            if m <= low {
                continue;
            }
            let ax = i64::from(g.dx.abs());
            let ay = i64::from(g.dy.abs()) << SHIFT;
            let tg22x = ax * TG22;
            let maximum = if ay < tg22x {
                m > mag(x - 1, y) && m >= mag(x + 1, y)
            } else if ay > tg22x + (ax << (SHIFT + 1)) {
                m > mag(x, y - 1) && m >= mag(x, y + 1)
            } else {
                // Signs differ: the gradient runs along the anti-diagonal.
                let s = if (g.dx < 0) != (g.dy < 0) { -1 } else { 1 };
                m > mag(x - s, y - 1) && m > mag(x + s, y + 1)
            };
            if maximum {
                marks[y as usize * w + x as usize] = if m > high { Mark::Strong } else { Mark::Weak };
            }
        }
    }
    marks
}

/// Grows the strong pixels through 8-connected weak ones; 255 where an edge.
fn hysteresis(mut marks: Vec<Mark>, w: usize, h: usize) -> Vec<u8> {
    let mut stack: Vec<usize> = (0..marks.len()).filter(|&i| marks[i] == Mark::Strong).collect();
    while let Some(i) = stack.pop() {
        let (x, y) = ((i % w) as isize, (i / w) as isize);
        for (dx, dy) in [(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)] {
            let (nx, ny) = (x + dx, y + dy);
            if nx < 0 || ny < 0 || nx >= w as isize || ny >= h as isize {
                continue;
            }
            let n = ny as usize * w + nx as usize;
            if marks[n] == Mark::Weak {
                marks[n] = Mark::Strong;
                stack.push(n);
            }
        }
    }
    marks.into_iter().map(|m| if m == Mark::Strong { 255 } else { 0 }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> RgbImage {
        let f = &f;
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| [f(x, y); 3])).collect();
        RgbImage { width: w, height: h, data }
    }

    #[test]
    fn a_step_gives_one_line_and_flat_gives_none() {
        let step = image(12, 8, |x, _| if x < 6 { 0 } else { 200 });
        let edges = canny(&step, 50.0, 100.0).unwrap();
        for y in 0..8 {
            let row: Vec<u8> = edges[y * 12..(y + 1) * 12].to_vec();
            // The two columns at the step have equal magnitude; the strict test keeps the left one.
            assert_eq!(row.iter().filter(|&&v| v == 255).count(), 1, "row {y}: {row:?}");
            assert_eq!(row[5], 255, "row {y}: {row:?}");
        }
        assert!(canny(&image(5, 5, |_, _| 77), 1.0, 2.0).unwrap().iter().all(|&v| v == 0));
        // Thresholds the other way round are swapped; above the step's magnitude nothing is left.
        assert_eq!(canny(&step, 100.0, 50.0).unwrap(), edges);
        assert!(canny(&step, 900.0, 900.0).unwrap().iter().all(|&v| v == 0));
    }

    #[test]
    fn weak_pixels_survive_only_when_connected_to_strong_ones() {
        // A ramp whose edge strength grows along the line: low catches all of
        // it, high only its strong end, hysteresis carries the rest.
        let img = image(16, 8, |x, y| if y < 4 { 0 } else { (40 + 10 * x) as u8 });
        let (all, none) = (canny(&img, 30.0, 40.0).unwrap(), canny(&img, 30.0, 2000.0).unwrap());
        let count = |e: &[u8]| e.iter().filter(|&&v| v == 255).count();
        assert!(count(&all) >= 16, "{all:?}");
        assert_eq!(count(&none), 0);
        // Only the line's bright end passes 700 (4 × its step of 190 is 760).
        let strong_end = canny(&img, 30.0, 700.0).unwrap();
        assert_eq!(count(&strong_end), count(&all), "hysteresis reaches the whole line");
    }

    #[test]
    fn bad_inputs_are_refused() {
        let bad = RgbImage { width: 2, height: 2, data: vec![0; 5] };
        assert!(canny(&bad, 1.0, 2.0).is_err());
        assert!(canny(&image(2, 2, |_, _| 0), f64::NAN, 2.0).is_err());
    }
}
