//! SigLIP's forward captured once as a CUDA graph and replayed.
//!
//! At batch 1 the so400m encoder is about 550 small kernels, ~1 TFLOP in all
//! (well under a millisecond of tensor-core time on an H200); eager, each
//! kernel costs candle's host-side work and a launch, so a call takes ~11 ms
//! (session 11) — the host, not the GPU, sets the pace (PyTorch's eager call
//! is launch-bound the same way). A graph records the launches once and
//! replays them with one driver call.
//!
//! What it does: [`GraphedEncoder::capture`] runs the model once eagerly (so
//! every kernel module is loaded and cuBLAS is initialised), then captures
//! one forward from a fixed input buffer into a fixed output buffer on the
//! device's stream. [`GraphedEncoder::forward`] copies the pixels into the
//! input buffer, replays, and returns a copy of the output. The replay runs
//! the same kernels in the same order as an eager call, so its result is
//! bit-identical (`gpu-check` checks this).
//!
//! What it does not do: change shape (a graph is for one batch size and
//! image size), survive a weight move (the graph holds the weights'
//! addresses; it owns the model, so the weights cannot move under it: give
//! the model back with [`GraphedEncoder::into_model`] first), or pay off for
//! one call (capturing costs an eager call and more; it is for repeated
//! encodes). The graph's intermediate tensors live in the driver's graph
//! memory pool while the graph exists ([`GraphedEncoder::reserved_bytes`]),
//! memory an owner must count beside the weights.

use std::mem::ManuallyDrop;
use std::sync::Arc;

use ipaflux_core::candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
use ipaflux_core::candle_core::{self as candle, Device, Tensor};
use ipaflux_core::SiglipVisionModel;

use super::pinned::cuda_err;

/// A SigLIP model with its forward captured as a CUDA graph.
pub struct GraphedEncoder {
    model: SiglipVisionModel,
    input: Tensor,
    output: Tensor,
    graph: OwnedGraph,
    reserved: u64,
}

/// A graph that, dropped, waits for its stream, is destroyed, and gives the
/// graph pool's unused memory back to the driver (the pool keeps it
/// otherwise, unseen by the registry).
struct OwnedGraph {
    graph: ManuallyDrop<CudaGraph>,
    stream: Arc<CudaStream>,
}

impl Drop for OwnedGraph {
    fn drop(&mut self) {
        if let Err(e) = self.stream.synchronize() {
            tracing::warn!(error = %e, "CUDA graph: the stream failed before the graph was dropped");
        }
        // SAFETY: dropped exactly once, here; `self.graph` is not used after.
        unsafe { ManuallyDrop::drop(&mut self.graph) };
        // SAFETY: a driver call on a valid device handle; it frees only pool
        // memory no graph is using.
        let trimmed = unsafe { sys::cuDeviceGraphMemTrim(self.stream.context().cu_device()) }.result();
        if let Err(e) = trimmed {
            tracing::warn!(error = %e, "CUDA graph: trimming the graph memory pool failed");
        }
    }
}

/// Why a capture failed, with the model given back to run eagerly.
pub struct CaptureFailed {
    pub model: SiglipVisionModel,
    pub error: candle::Error,
}

impl std::fmt::Debug for CaptureFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureFailed").field("error", &self.error).finish()
    }
}

impl GraphedEncoder {
    /// Captures `model`'s forward for `batch` images at its configured size
    /// and precision. The device's context must not track events across
    /// streams ([`super::explicit_stream_ordering`] before the weights were
    /// made): a capture cannot wait on events recorded outside it. On
    /// failure the model comes back unchanged, with the reason.
    pub fn capture(model: SiglipVisionModel, batch: usize) -> Result<Self, Box<CaptureFailed>> {
        match Self::buffers(&model, batch) {
            Ok((stream, input, output)) => match capture_forward(&model, &stream, &input, &output) {
                Ok((graph, reserved)) => Ok(Self { model, input, output, graph, reserved }),
                Err(error) => Err(Box::new(CaptureFailed { model, error })),
            },
            Err(error) => Err(Box::new(CaptureFailed { model, error })),
        }
    }

    /// The fixed buffers, after one eager call from the input buffer.
    fn buffers(model: &SiglipVisionModel, batch: usize) -> candle::Result<(Arc<CudaStream>, Tensor, Tensor)> {
        let cfg = model.config();
        let device = model.device();
        let Device::Cuda(cuda) = device else {
            return Err(candle::Error::Msg(format!("a CUDA graph needs a CUDA device, not {device:?}")));
        };
        if cuda.is_event_tracking() {
            return Err(candle::Error::Msg(
                "the CUDA context tracks events across streams; call cuda::explicit_stream_ordering before \
                 loading the model"
                    .into(),
            ));
        }
        let input = Tensor::zeros((batch, 3, cfg.image_size, cfg.image_size), model.dtype(), device)?;
        let warm = model.forward(&input).map_err(core_err)?;
        let output = warm.zeros_like()?;
        drop(warm);
        device.synchronize()?;
        Ok((cuda.cuda_stream(), input, output))
    }

    /// The pooled embedding `[B, hidden]` of `pixels` (`[B, 3, S, S]`, the
    /// captured batch and size; converted to the model's dtype).
    pub fn forward(&self, pixels: &Tensor) -> candle::Result<Tensor> {
        if pixels.dims() != self.input.dims() {
            return Err(candle::Error::Msg(format!(
                "this CUDA graph was captured for pixels {:?}, not {:?}; capture another",
                self.input.dims(),
                pixels.dims()
            )));
        }
        self.input.slice_set(&pixels.to_dtype(self.input.dtype())?.contiguous()?, 0, 0)?;
        self.graph.graph.launch().map_err(cuda_err)?;
        self.output.copy()
    }

    /// Bytes the driver's graph memory pool holds for this device after the
    /// capture's first replay (the intermediates; the weights and the two
    /// buffers are ordinary allocations). All graphs of the device share the pool.
    pub fn reserved_bytes(&self) -> u64 {
        self.reserved
    }

    /// The model, to run eagerly or move; the graph is dropped (and the
    /// graph pool's memory given back).
    pub fn into_model(self) -> SiglipVisionModel {
        self.model
    }
}

fn core_err(e: ipaflux_core::Error) -> candle::Error {
    candle::Error::Msg(e.to_string())
}

/// Captures one forward from `input` into `output` on `stream`, replays it
/// once, and reads the graph pool's reservation.
fn capture_forward(
    model: &SiglipVisionModel,
    stream: &Arc<CudaStream>,
    input: &Tensor,
    output: &Tensor,
) -> candle::Result<(OwnedGraph, u64)> {
    // Thread-local: other threads' unsafe calls (a synchronous allocation,
    // say) do not invalidate this capture.
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL).map_err(cuda_err)?;
    let recorded = model.forward(input).map_err(core_err).and_then(|out| output.slice_set(&out, 0, 0));
    // Whatever happened, the capture must end before the stream is used again.
    // Every tensor made during it has been dropped by now (freed inside the
    // graph); auto-free guards a relaunch against any that was not.
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let ctx = stream.context();
    if let Err(e) = recorded {
        // Frees of never-made allocations during a broken capture leave an
        // error in the context; clear it, the capture's error says more.
        let _ = ctx.check_err();
        return Err(candle::Error::Msg(format!("capturing SigLIP's forward as a CUDA graph failed: {e}")));
    }
    let graph =
        ended.map_err(cuda_err)?.ok_or_else(|| candle::Error::Msg("the CUDA graph capture recorded nothing".into()))?;
    let graph = OwnedGraph { graph: ManuallyDrop::new(graph), stream: stream.clone() };
    ctx.check_err().map_err(cuda_err)?;
    graph.graph.upload().map_err(cuda_err)?;
    graph.graph.launch().map_err(cuda_err)?;
    stream.synchronize().map_err(cuda_err)?;
    let mut reserved = 0u64;
    // SAFETY: a plain attribute query writing one u64 into `reserved`.
    let r = unsafe {
        sys::cuDeviceGetGraphMemAttribute(
            ctx.cu_device(),
            sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT,
            (&mut reserved as *mut u64).cast(),
        )
    };
    r.result().map_err(cuda_err)?;
    Ok((graph, reserved))
}

#[cfg(test)]
mod tests {
    use ipaflux_core::candle_core::DType;
    use ipaflux_core::candle_nn::VarBuilder;
    use ipaflux_core::siglip::expected_tensors;

    use super::*;

    #[test]
    fn a_cpu_model_is_refused_and_given_back_working() {
        let cfg = crate::gpu_check::siglip_config(true);
        let weights = crate::gpu_check::random_weights(&expected_tensors(&cfg), DType::F32, &Device::Cpu)
            .expect("random weights");
        let model =
            SiglipVisionModel::new(&cfg, VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu)).expect("model");
        let failed = GraphedEncoder::capture(model, 1).err().expect("a CPU model cannot be captured");
        assert!(failed.error.to_string().contains("needs a CUDA device"), "{}", failed.error);
        let pixels = Tensor::zeros((1, 3, cfg.image_size, cfg.image_size), DType::F32, &Device::Cpu).expect("pixels");
        assert_eq!(failed.model.forward(&pixels).expect("eager forward").dims(), [1, cfg.hidden_size]);
    }
}
