//! The record of everything the registry did, in order, with the reason.

use std::fmt;

use serde::Serialize;

/// What happened to a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Entered the registry (its bytes now count on its offload device).
    Register,
    /// Attached under an owner's key (or replaced what was there).
    Attach,
    /// All its units placed on the load device.
    Load,
    /// Some units placed; the others are streamed per use.
    PartialLoad,
    /// Units copied in for one use and dropped after (block streaming).
    Stream,
    /// Moved back to its offload device by request (e.g. preprocessing done).
    Offload,
    /// Moved back to its offload device to make room for a job.
    Evict,
    /// Left where it is, on purpose (e.g. `offload_preprocessing` off).
    Keep,
    /// Left the registry: its last handle was released and no owner holds it.
    Release,
    /// Memory the device's allocator kept for reuse after its owners freed it
    /// went back to the platform ([`super::Registry::release_cached`]).
    ReleaseCache,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Attach => "attach",
            Self::Load => "load",
            Self::PartialLoad => "partial_load",
            Self::Stream => "stream",
            Self::Offload => "offload",
            Self::Evict => "evict",
            Self::Keep => "keep",
            Self::Release => "release",
            Self::ReleaseCache => "release_cache",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One line of the timeline; also emitted as a `tracing` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    pub stage: String,
    pub op: Op,
    pub model: String,
    /// Bytes this event moved or placed (for `stream`: over all uses).
    pub bytes: u64,
    /// The device the bytes went to (or were counted on, for `register`/`release`).
    pub device: String,
    pub reason: String,
}

/// Running totals, kept apart from the event list so draining events loses nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    /// Host → device bytes (loads and streamed units).
    pub h2d_bytes: u64,
    /// Device → host bytes (offloads and evictions).
    pub d2h_bytes: u64,
}
