//! Block streaming: running a Flux model whose blocks are not all resident on
//! the compute device.
//!
//! When the memory registry loads Flux partially (`JobPlan::placements`:
//! `resident` and `streamed` units), the owner takes the streamed blocks out
//! of the model ([`FluxModel::stream_blocks`](super::FluxModel::stream_blocks)),
//! keeps their tensors wherever it likes, and gives the model a
//! [`BlockSource`]. Each forward then asks the source for a streamed block's
//! tensors just before the block runs and drops them right after, and tells
//! the source which streamed block comes next *before* running the current
//! one, so a source with a copy engine (CUDA: a second stream from pinned
//! memory, in `ipaflux`) overlaps the next block's copy with this block's
//! compute. At most two streamed blocks are alive at once: the one running
//! and the one being copied, the registry's two-unit stream buffer.
//!
//! [`HostBlocks`] is the plain source: tensors on some device (the CPU), moved
//! to the compute device on fetch, no overlap. It is what non-CUDA devices use
//! and what the tests check the streamed forward with.
//!
//! Not here: deciding what to stream (the registry), pinned memory and
//! streams (the CUDA source in `ipaflux`).

use std::collections::BTreeMap;
use std::fmt;

use candle_core::{DType, Device, Tensor};

use super::config::FluxConfig;
use super::model::canonical_tensors;
use crate::error::{Error, Result};
use crate::registry::UnitSpec;

/// One Flux block, in execution order: every double block, then every single block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockId {
    Double(usize),
    Single(usize),
}

impl BlockId {
    /// The canonical (BFL) name prefix of its tensors, e.g. `double_blocks.3`.
    pub fn prefix(self) -> String {
        match self {
            Self::Double(i) => format!("double_blocks.{i}"),
            Self::Single(i) => format!("single_blocks.{i}"),
        }
    }

    /// Every block of a model with this config, in execution order.
    pub fn all(cfg: &FluxConfig) -> Vec<BlockId> {
        (0..cfg.depth).map(Self::Double).chain((0..cfg.depth_single).map(Self::Single)).collect()
    }

    /// Whether canonical tensor `name` belongs to this block.
    pub fn owns(self, name: &str) -> bool {
        name.strip_prefix(&self.prefix()).is_some_and(|rest| rest.starts_with('.'))
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix())
    }
}

/// Name of the registry unit that holds everything outside the blocks
/// (embedders, final layer): the first unit, needed first and last.
pub const BASE_UNIT: &str = "flux.base";

/// The registry units of a Flux model stored in `dtype`: [`BASE_UNIT`], then
/// one unit per block in execution order, each with its exact bytes. The
/// registry keeps a prefix of these resident when memory is short, so the
/// streamed blocks are the last ones; [`blocks_of_units`] maps its answer back.
pub fn unit_specs(cfg: &FluxConfig, dtype: DType) -> Vec<UnitSpec> {
    let blocks = BlockId::all(cfg);
    let mut bytes = vec![0u64; blocks.len() + 1];
    for (name, shape) in canonical_tensors(cfg) {
        let n = (shape.iter().product::<usize>() * dtype.size_in_bytes()) as u64;
        let slot = blocks.iter().position(|b| b.owns(&name)).map_or(0, |i| i + 1);
        bytes[slot] += n;
    }
    std::iter::once(BASE_UNIT.to_string())
        .chain(blocks.iter().map(|b| b.prefix()))
        .zip(bytes)
        .map(|(name, bytes)| UnitSpec { name, bytes })
        .collect()
}

/// The blocks behind registry unit indices of [`unit_specs`] (the base unit
/// cannot be streamed: an error names it).
pub fn blocks_of_units(cfg: &FluxConfig, units: &[usize]) -> Result<Vec<BlockId>> {
    let blocks = BlockId::all(cfg);
    units
        .iter()
        .map(|&u| match u.checked_sub(1).and_then(|i| blocks.get(i)) {
            Some(b) => Ok(*b),
            None if u == 0 => Err(Error::Registry(format!(
                "unit 0 ({BASE_UNIT}: embedders and final layer) must be resident to run Flux; give the job more memory"
            ))),
            None => {
                Err(Error::Registry(format!("unit {u} is not a unit of this Flux model ({} units)", blocks.len() + 1)))
            }
        })
        .collect()
}

/// Where the tensors of streamed blocks come from.
pub trait BlockSource: fmt::Debug + Send + Sync {
    /// Starts bringing `block`'s tensors to the compute device; may return
    /// before they are there. Called once per use, before [`Self::fetch`].
    fn prefetch(&self, block: BlockId) -> Result<()>;
    /// `block`'s tensors on the compute device by canonical name, usable by
    /// work queued after this call (a prefetch in flight is waited for, on
    /// the device's queue where it has one). Without a prefetch, copies now.
    fn fetch(&self, block: BlockId) -> Result<BTreeMap<String, Tensor>>;
    /// Forgets blocks prefetched and not fetched, freeing what they hold: the
    /// model calls it when a forward fails part-way. Default: nothing held.
    fn discard_prefetched(&self) {}
}

/// Streamed blocks kept as tensors on one device (normally the CPU) and
/// copied to the compute device when fetched. No overlap: a copy runs when
/// its block is fetched.
pub struct HostBlocks {
    blocks: BTreeMap<BlockId, BTreeMap<String, Tensor>>,
    device: Device,
}

impl fmt::Debug for HostBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostBlocks").field("blocks", &self.blocks.len()).field("device", &self.device).finish()
    }
}

impl HostBlocks {
    /// Moves `tensors` (canonical names of the given blocks, e.g. what
    /// [`FluxModel::stream_blocks`](super::FluxModel::stream_blocks) returned)
    /// to `host`; fetches copy them to `compute`.
    pub fn new(tensors: BTreeMap<String, Tensor>, blocks: &[BlockId], host: &Device, compute: &Device) -> Result<Self> {
        let mut by_block: BTreeMap<BlockId, BTreeMap<String, Tensor>> =
            blocks.iter().map(|&b| (b, BTreeMap::new())).collect();
        for (name, t) in tensors {
            let block = blocks.iter().find(|b| b.owns(&name)).ok_or_else(|| {
                Error::Shape(format!("streamed tensor `{name}` belongs to none of the streamed blocks"))
            })?;
            let t = t.to_device(host)?;
            by_block.entry(*block).or_default().insert(name, t);
        }
        Ok(Self { blocks: by_block, device: compute.clone() })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.blocks.values().flat_map(|m| m.values()).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
    }
}

impl BlockSource for HostBlocks {
    fn prefetch(&self, _block: BlockId) -> Result<()> {
        Ok(())
    }

    fn fetch(&self, block: BlockId) -> Result<BTreeMap<String, Tensor>> {
        let tensors = self
            .blocks
            .get(&block)
            .ok_or_else(|| Error::Registry(format!("{block} is streamed but this source does not hold it")))?;
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_device(&self.device)?))).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::flux::testing::{inputs, random_map, random_model, run, tiny};
    use crate::flux::{FluxModel, Site};

    /// Records the calls a model makes, and which fetched blocks are still alive.
    #[derive(Debug)]
    struct Recording {
        inner: HostBlocks,
        calls: Mutex<Vec<String>>,
    }

    impl BlockSource for Recording {
        fn prefetch(&self, block: BlockId) -> Result<()> {
            self.calls.lock().unwrap().push(format!("prefetch {block}"));
            self.inner.prefetch(block)
        }
        fn fetch(&self, block: BlockId) -> Result<BTreeMap<String, Tensor>> {
            self.calls.lock().unwrap().push(format!("fetch {block}"));
            self.inner.fetch(block)
        }
        fn discard_prefetched(&self) {
            self.calls.lock().unwrap().push("discard".into());
        }
    }

    /// Fails at one block: a forward that stops part-way.
    #[derive(Debug)]
    struct FailAt(Site);

    impl crate::flux::hooks::AttentionHook for FailAt {
        fn name(&self) -> &str {
            "fail"
        }
        fn attention(&self, at: &crate::flux::HookPoint, _q: &Tensor, _attn: &Tensor) -> Result<Option<Tensor>> {
            if at.site == self.0 {
                return Err(Error::Unsupported("planted failure".into()));
            }
            Ok(None)
        }
    }

    #[test]
    fn a_forward_that_fails_part_way_discards_what_it_prefetched() {
        let cfg = tiny();
        let mut streamed = random_model(&cfg);
        let blocks = [BlockId::Double(1), BlockId::Single(1)];
        let tensors = streamed.stream_blocks(&blocks).unwrap();
        let inner = HostBlocks::new(tensors, &blocks, &Device::Cpu, &Device::Cpu).unwrap();
        let source = Arc::new(Recording { inner, calls: Mutex::new(Vec::new()) });
        streamed.set_block_source(source.clone());
        let x = inputs(&cfg);
        let fail = FailAt(Site::Double { index: 1 });
        let hooks: [&dyn crate::flux::hooks::AttentionHook; 1] = [&fail];
        let err = streamed.forward(&x.img, &x.ids, &x.cond, 0.7, 0, crate::flux::Hooks::new(&hooks));
        assert!(err.unwrap_err().to_string().contains("planted failure"));
        let calls = source.calls.lock().unwrap().clone();
        // single_blocks.1 was prefetched while double_blocks.1 ran, then discarded.
        assert_eq!(calls, ["prefetch double_blocks.1", "fetch double_blocks.1", "prefetch single_blocks.1", "discard"]);
        // A forward that succeeds discards nothing.
        source.calls.lock().unwrap().clear();
        run(&streamed, &x).unwrap();
        assert!(!source.calls.lock().unwrap().iter().any(|c| c == "discard"));
    }

    #[test]
    fn units_cover_every_tensor_once_and_map_back_to_blocks() {
        let cfg = FluxConfig::dev();
        let units = unit_specs(&cfg, DType::BF16);
        assert_eq!(units.len(), 1 + 19 + 38);
        let total: u64 = canonical_tensors(&cfg).iter().map(|(_, s)| 2 * s.iter().product::<usize>() as u64).sum();
        assert_eq!(units.iter().map(|u| u.bytes).sum::<u64>(), total);
        // FLUX.1-dev bf16: 11.9 B parameters; a double block 339.8 M, a single 141.6 M.
        assert_eq!(units[1].bytes, 2 * 339_831_296);
        assert_eq!(units[20].bytes, 2 * 141_591_808);
        assert_eq!(units[1].name, "double_blocks.0");
        assert_eq!(units[57].name, "single_blocks.37");
        let blocks = blocks_of_units(&cfg, &[1, 19, 20, 57]).unwrap();
        assert_eq!(blocks, [BlockId::Double(0), BlockId::Double(18), BlockId::Single(0), BlockId::Single(37)]);
        assert!(blocks_of_units(&cfg, &[0]).unwrap_err().to_string().contains("must be resident"));
        assert!(blocks_of_units(&cfg, &[58]).is_err());
        // `double_blocks.1` does not own `double_blocks.10.*`.
        assert!(!BlockId::Double(1).owns("double_blocks.10.img_mod.lin.weight"));
        assert!(BlockId::Double(1).owns("double_blocks.1.img_mod.lin.weight"));
    }

    #[test]
    fn streamed_forward_equals_resident_and_prefetches_one_block_ahead() {
        let cfg = tiny();
        let resident = random_model(&cfg);
        let mut streamed = resident.clone();
        let blocks = [BlockId::Double(1), BlockId::Single(0), BlockId::Single(2)];
        let tensors = streamed.stream_blocks(&blocks).unwrap();
        // Every tensor of those blocks, nothing else.
        let expected: Vec<String> =
            canonical_tensors(&cfg).into_iter().map(|(n, _)| n).filter(|n| blocks.iter().any(|b| b.owns(n))).collect();
        assert_eq!(tensors.keys().cloned().collect::<Vec<_>>(), {
            let mut e = expected.clone();
            e.sort();
            e
        });
        assert_eq!(streamed.streamed_blocks(), blocks);
        let x = inputs(&cfg);
        let err = run(&streamed, &x).unwrap_err().to_string();
        assert!(err.contains("no block source"), "{err}");

        let inner = HostBlocks::new(tensors, &blocks, &Device::Cpu, &Device::Cpu).unwrap();
        let source = Arc::new(Recording { inner, calls: Mutex::new(Vec::new()) });
        streamed.set_block_source(source.clone());
        let a = run(&resident, &x).unwrap();
        let b = run(&streamed, &x).unwrap();
        assert_eq!(a, b, "streaming changes no number");
        let calls = source.calls.lock().unwrap().clone();
        assert_eq!(
            calls,
            [
                "prefetch double_blocks.1",
                "fetch double_blocks.1",
                "prefetch single_blocks.0",
                "fetch single_blocks.0",
                "prefetch single_blocks.2",
                "fetch single_blocks.2",
            ]
        );
        // Streaming twice is a no-op; a block the model lacks is an error.
        assert!(streamed.stream_blocks(&blocks).unwrap().is_empty());
        assert!(streamed.stream_blocks(&[BlockId::Single(3)]).is_err());
    }

    #[test]
    fn loading_with_blocks_left_behind_equals_resident() {
        let cfg = tiny();
        let map = random_map(&cfg);
        let resident = FluxModel::from_canonical(cfg.clone(), map.clone(), DType::F32, &Device::Cpu).unwrap();
        let blocks = [BlockId::Double(0), BlockId::Single(1)];
        let (mut streamed, kept) =
            FluxModel::from_canonical_streamed(cfg.clone(), map.clone(), DType::F32, &Device::Cpu, &blocks).unwrap();
        assert_eq!(streamed.streamed_blocks(), blocks);
        assert!(kept.keys().all(|n| blocks.iter().any(|b| b.owns(n))));
        assert_eq!(kept.len(), map.keys().filter(|n| blocks.iter().any(|b| b.owns(n))).count());
        streamed.set_block_source(Arc::new(HostBlocks::new(kept, &blocks, &Device::Cpu, &Device::Cpu).unwrap()));
        let x = inputs(&cfg);
        assert_eq!(run(&resident, &x).unwrap(), run(&streamed, &x).unwrap());
        // A block the config does not have is refused.
        let err = FluxModel::from_canonical_streamed(cfg, map, DType::F32, &Device::Cpu, &[BlockId::Double(2)]);
        assert!(err.is_err());
    }

    /// A stand-in for a device's fused kernels: the reference math, counted.
    #[derive(Debug, Default)]
    struct Counting {
        modulate: std::sync::atomic::AtomicUsize,
        gated: std::sync::atomic::AtomicUsize,
    }

    impl crate::nn::FusedModulation for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn ln_modulate(&self, x: &Tensor, scale: &Tensor, shift: &Tensor, eps: f64) -> Option<Result<Tensor>> {
            self.modulate.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ln = crate::nn::LayerNorm::no_affine(x.dim(2).ok()?, eps, x.device()).ok()?;
            Some(crate::nn::modulate(None, &ln, x, scale, shift))
        }
        fn gated_add(&self, x: &Tensor, y: &Tensor, bias: Option<&Tensor>, gate: &Tensor) -> Option<Result<Tensor>> {
            self.gated.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some(crate::nn::gated_add(None, x, y, bias, gate))
        }
    }

    #[test]
    fn fused_modulation_runs_at_every_modulated_sublayer_and_changes_nothing_here() {
        let cfg = tiny();
        let plain = random_model(&cfg);
        let mut fused = plain.clone();
        let kernels = Arc::new(Counting::default());
        fused.set_fused_modulation(Some(kernels.clone()));
        let x = inputs(&cfg);
        assert_eq!(run(&plain, &x).unwrap(), run(&fused, &x).unwrap());
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
        // Per double block 2 streams × 2 sub-layers; per single block 1; the final layer's modulation.
        assert_eq!(load(&kernels.modulate), cfg.depth * 4 + cfg.depth_single + 1);
        assert_eq!(load(&kernels.gated), cfg.depth * 4 + cfg.depth_single);
    }

    #[test]
    fn host_blocks_refuse_tensors_of_other_blocks_and_unknown_fetches() {
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let map = BTreeMap::from([("single_blocks.1.linear1.bias".to_string(), t)]);
        assert!(HostBlocks::new(map.clone(), &[BlockId::Single(0)], &Device::Cpu, &Device::Cpu).is_err());
        let src = HostBlocks::new(map, &[BlockId::Single(1)], &Device::Cpu, &Device::Cpu).unwrap();
        assert_eq!(src.bytes(), 8);
        assert!(src.fetch(BlockId::Single(0)).is_err());
        assert_eq!(src.fetch(BlockId::Single(1)).unwrap().len(), 1);
    }
}
