//! Byte counts as people write them: `24GiB`, `9.52 GB`, `512MiB`, `1234`.

use std::fmt;

use crate::error::{Error, Result};

/// Powers of 1024 and 1000 by suffix (case-insensitive, `B` optional).
const UNITS: &[(&str, u64)] = &[
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
    ("kb", 1_000),
    ("mb", 1_000_000),
    ("gb", 1_000_000_000),
    ("tb", 1_000_000_000_000),
    ("k", 1 << 10),
    ("m", 1 << 20),
    ("g", 1 << 30),
    ("t", 1 << 40),
    ("b", 1),
    ("", 1),
];

/// Parses a size: plain bytes or a number with a unit (`GiB` = 2³⁰, `GB` = 10⁹; bare `G` = GiB as in `--reserve-vram`).
pub fn parse_bytes(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase().replace('_', "");
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = (t[..split].trim(), t[split..].trim());
    let bad = || {
        Error::Unsupported(format!(
            "`{text}` is not a size; write bytes or a number with a unit, like `24GiB` or `9.52GB`"
        ))
    };
    let (_, scale) = UNITS.iter().find(|(u, _)| *u == unit).ok_or_else(bad)?;
    if number.is_empty() {
        return Err(bad());
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(*scale).ok_or_else(bad);
    }
    let value: f64 = number.parse().map_err(|_| bad())?;
    let bytes = (value * *scale as f64).round();
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Displays a byte count in GiB / MiB / KiB with two decimals, or bytes below 1 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scale, unit) = match self.0 {
            n if n >= 1 << 30 => (1u64 << 30, "GiB"),
            n if n >= 1 << 20 => (1 << 20, "MiB"),
            n if n >= 1 << 10 => (1 << 10, "KiB"),
            n => return f.pad(&format!("{n} B")),
        };
        // Integer rounding to hundredths: no float formatting on the registry's hot path.
        let hundredths = (u128::from(self.0) * 100 + u128::from(scale) / 2) / u128::from(scale);
        f.pad(&format!("{}.{:02} {unit}", hundredths / 100, hundredths % 100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_bytes("24GiB").ok(), Some(24 << 30));
        assert_eq!(parse_bytes("24 gib").ok(), Some(24 << 30));
        assert_eq!(parse_bytes("9.52GB").ok(), Some(9_520_000_000));
        assert_eq!(parse_bytes("512MiB").ok(), Some(512 << 20));
        assert_eq!(parse_bytes("1234").ok(), Some(1234));
        assert_eq!(parse_bytes("2G").ok(), Some(2 << 30));
        assert_eq!(parse_bytes("1_000B").ok(), Some(1000));
        for bad in ["", "GiB", "12 parsecs", "-3GB", "1e999GB", "99999999999999999999TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn displays_binary_units() {
        assert_eq!(Bytes(512).to_string(), "512 B");
        assert_eq!(Bytes(24 << 30).to_string(), "24.00 GiB");
        assert_eq!(Bytes(1536 << 20).to_string(), "1.50 GiB");
        assert_eq!(Bytes(3 << 20).to_string(), "3.00 MiB");
        assert_eq!(Bytes(23_800_000_000).to_string(), "22.17 GiB");
        assert_eq!(Bytes((1 << 30) - 1).to_string(), "1024.00 MiB");
        assert_eq!(Bytes(u64::MAX).to_string(), "17179869184.00 GiB");
    }
}
