//! What the registry manages: models made of units that are placed one by one.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// What a model is for. Decides nothing on its own except two documented things:
/// preprocessing models may be offloaded once their outputs are cached
/// ([`Role::is_preprocessing`]), and loading a cache is an allocation, not a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Diffusion,
    TextEncoder,
    Vae,
    ImageEncoder,
    Projection,
    IpProcessors,
    /// Outputs computed on the device (the per-block IP K/V): made there, never copied in.
    Cache,
    Other,
}

impl Role {
    pub const ALL: [Role; 8] = [
        Role::Diffusion,
        Role::TextEncoder,
        Role::Vae,
        Role::ImageEncoder,
        Role::Projection,
        Role::IpProcessors,
        Role::Cache,
        Role::Other,
    ];

    /// Image encoder, projection and IP processors: needed only until the image
    /// embeddings and per-block K/V exist.
    pub fn is_preprocessing(self) -> bool {
        matches!(self, Self::ImageEncoder | Self::Projection | Self::IpProcessors)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Diffusion => "diffusion",
            Self::TextEncoder => "text_encoder",
            Self::Vae => "vae",
            Self::ImageEncoder => "image_encoder",
            Self::Projection => "projection",
            Self::IpProcessors => "ip_processors",
            Self::Cache => "cache",
            Self::Other => "other",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Role::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| {
            let names: Vec<_> = Role::ALL.iter().map(|r| r.name()).collect();
            Error::Registry(format!("unknown role `{s}`; expected one of {}", names.join(", ")))
        })
    }
}

/// A piece of a model that is placed as a whole: a transformer block, a layer,
/// one IP processor. A model with one unit is either resident or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitSpec {
    pub name: String,
    pub bytes: u64,
}

/// A model to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub name: String,
    pub role: Role,
    /// Where the model runs.
    pub load_device: DeviceSpec,
    /// Where it waits when not resident (normally `cpu`).
    pub offload_device: DeviceSpec,
    /// In execution order; the registry loads a prefix of them when memory is short.
    pub units: Vec<UnitSpec>,
    /// Identity of the weights (a file path and size, a hash). Registering the
    /// same weights again returns a new handle to the same entry: counted once.
    pub weights_key: Option<String>,
    /// Whether the code that runs it can take units not resident, copied in
    /// per use (Flux's blocks). **A model that cannot is planned resident
    /// whole or its job fails**: a plan never streams what its runner loads whole.
    pub streamable: bool,
    /// How many of its first units are resident whenever it runs, streamed
    /// or not: **a streamable model's base (Flux's embedders, which every
    /// block needs) is never streamed**. 0 for most models.
    pub resident_units: usize,
}

impl ModelSpec {
    /// A model split into `count` equal units (the remainder goes to the last), named `{prefix}.{i}`.
    pub fn uniform(name: &str, role: Role, load: DeviceSpec, bytes: u64, count: usize, prefix: &str) -> Self {
        let count = count.max(1);
        let each = bytes / count as u64;
        let units = (0..count)
            .map(|i| {
                let extra = if i + 1 == count { bytes - each * count as u64 } else { 0 };
                UnitSpec { name: format!("{prefix}.{i}"), bytes: each + extra }
            })
            .collect();
        Self {
            name: name.to_string(),
            role,
            load_device: load,
            offload_device: DeviceSpec::Cpu,
            units,
            weights_key: None,
            streamable: true,
            resident_units: 0,
        }
    }

    /// Its first `n` units are resident whenever it runs ([`Self::resident_units`]).
    pub fn with_resident_units(mut self, n: usize) -> Self {
        self.resident_units = n;
        self
    }

    /// Marks it as one whose runner loads it whole ([`Self::streamable`] false).
    pub fn resident_only(mut self) -> Self {
        self.streamable = false;
        self
    }

    pub fn with_weights_key(mut self, key: impl Into<String>) -> Self {
        self.weights_key = Some(key.into());
        self
    }

    pub fn bytes(&self) -> u64 {
        self.units.iter().map(|u| u.bytes).sum()
    }
}

/// A registered model, by slot and generation: an id outlives its entry safely
/// (a stale id is simply not found, never another model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

/// One caller's claim on a model. Each registration returns a distinct handle,
/// so releasing a handle twice is a no-op by construction, and two owners of
/// the same weights cannot release each other's claim. Dropping a handle
/// without releasing it does nothing (no finalizers); [`super::Registry::end_job`]
/// releases whatever a job registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelHandle {
    pub model: ModelId,
    pub(super) lease: u64,
}

/// A group of registrations released together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub(super) u64);

#[derive(Debug, Clone)]
pub(super) struct Unit {
    pub name: String,
    pub bytes: u64,
    pub resident: bool,
}

#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub name: String,
    pub role: Role,
    pub load_device: DeviceSpec,
    pub offload_device: DeviceSpec,
    pub units: Vec<Unit>,
    pub weights_key: Option<String>,
    pub leases: BTreeSet<u64>,
    pub attachments: BTreeMap<String, Vec<ModelId>>,
    /// Set by `embeddings_ready`; cleared when the model is requested explicitly again.
    pub outputs_cached: bool,
    /// Logical time of the last job that used it.
    pub last_used: u64,
    /// [`ModelSpec::streamable`].
    pub streamable: bool,
    /// [`ModelSpec::resident_units`].
    pub resident_units: usize,
}

impl Entry {
    pub fn size(&self) -> u64 {
        self.units.iter().map(|u| u.bytes).sum()
    }
    pub fn resident_bytes(&self) -> u64 {
        self.units.iter().filter(|u| u.resident).map(|u| u.bytes).sum()
    }
    pub fn resident_units(&self) -> usize {
        self.units.iter().filter(|u| u.resident).count()
    }
    /// Whether placing it on its load device moves anything at all.
    pub fn moves(&self) -> bool {
        self.load_device != self.offload_device
    }
}
