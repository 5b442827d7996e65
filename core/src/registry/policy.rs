//! The knobs: VRAM state, eviction policy, reserve and margins. Every rule the
//! registry follows is one of these, named and documented here.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Bytes kept free on a compute device beyond the reserve, for allocator
/// slack and kernels' scratch space that no estimate sees (ComfyUI keeps a
/// similar "minimum inference memory" of 0.8 GiB plus extras).
pub const DEFAULT_SAFETY_MARGIN: u64 = 1 << 30;

/// In [`VramState::Low`], the share of usable memory that weights may take;
/// the rest is left to activations and stream buffers.
pub const DEFAULT_LOW_VRAM_WEIGHT_PERCENT: u8 = 50;

/// How aggressively weights are kept on the compute device (ComfyUI's VRAM states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VramState {
    /// Load fully when the job fits after evicting others; otherwise load as
    /// many units as fit and stream the rest.
    #[default]
    Normal,
    /// Weights of a job take at most `low_vram_weight_percent` of usable memory
    /// (a model that fits under that cap loads fully); the rest is streamed,
    /// leaving room for activations.
    Low,
    /// Nothing stays resident: every unit is streamed in for its use.
    NoVram,
    /// Full loads only; never partial. A job that does not fit is an error
    /// (with the advice to use `normal`).
    High,
}

impl VramState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Low => "low",
            Self::NoVram => "no",
            Self::High => "high",
        }
    }
}

impl fmt::Display for VramState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for VramState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "normal" | "normal-vram" => Ok(Self::Normal),
            "low" | "low-vram" | "lowvram" => Ok(Self::Low),
            "no" | "no-vram" | "novram" => Ok(Self::NoVram),
            "high" | "high-vram" | "highvram" => Ok(Self::High),
            _ => Err(Error::Registry(format!("unknown VRAM state `{s}`; expected normal, low, no or high"))),
        }
    }
}

/// Which resident model gives up memory first when a job needs room. Only
/// models outside the job are candidates; each victim gives up units from its
/// last one backwards, only as many as needed (partial unload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Belady-style: models the caller's lookahead never needs again go first
    /// (preprocessing models with cached outputs before others), then the one
    /// needed furthest in the future; ties by least recently used. Without a
    /// lookahead this is LRU with cached-output models first.
    #[default]
    FurthestNextUse,
    /// Least recently used first.
    Lru,
    /// Most resident bytes first: fewest evictions.
    LargestFirst,
    /// ComfyUI's `free_memory` sort key, for comparison: most offloaded bytes
    /// first (partially loaded models), then fewest owners, then smallest size.
    /// It ignores what the next stages need.
    ComfyUi,
}

impl EvictionPolicy {
    pub const ALL: [Self; 4] = [Self::FurthestNextUse, Self::Lru, Self::LargestFirst, Self::ComfyUi];

    pub fn name(self) -> &'static str {
        match self {
            Self::FurthestNextUse => "furthest-next-use",
            Self::Lru => "lru",
            Self::LargestFirst => "largest-first",
            Self::ComfyUi => "comfyui",
        }
    }
}

impl fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EvictionPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            let names: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
            Error::Registry(format!("unknown eviction policy `{s}`; expected one of {}", names.join(", ")))
        })
    }
}

/// Everything that shapes the registry's decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryConfig {
    pub state: VramState,
    /// Kept free on every compute device for other programs (`--reserve-vram`).
    pub reserve_bytes: u64,
    /// Kept free in addition to the reserve; see [`DEFAULT_SAFETY_MARGIN`].
    pub safety_margin_bytes: u64,
    /// Offload image encoder, projection and IP processors once their outputs are cached.
    pub offload_preprocessing: bool,
    pub policy: EvictionPolicy,
    /// See [`DEFAULT_LOW_VRAM_WEIGHT_PERCENT`]; values above 100 count as 100.
    pub low_vram_weight_percent: u8,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            state: VramState::Normal,
            reserve_bytes: 0,
            safety_margin_bytes: DEFAULT_SAFETY_MARGIN,
            offload_preprocessing: true,
            policy: EvictionPolicy::default(),
            low_vram_weight_percent: DEFAULT_LOW_VRAM_WEIGHT_PERCENT,
        }
    }
}
