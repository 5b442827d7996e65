//! Adapter and device setup, kept apart from the kernels (as wgpu's
//! `hello_compute` does), plus the few helpers every kernel uses: buffer
//! creation, one-dispatch submission, readback.

use std::cell::RefCell;
use std::collections::HashMap;

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};

/// How to pick the adapter.
#[derive(Debug, Clone, Default)]
pub struct GpuOptions {
    /// Prefer a low-power (integrated) adapter.
    pub low_power: bool,
    /// Accept a software adapter (lavapipe, SwiftShader). On by default:
    /// that is what CI and GPU-less browsers have.
    pub refuse_software: bool,
}

/// What the adapter is, for reports and the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    pub name: String,
    pub backend: String,
    pub device_type: String,
    pub max_buffer_size: u64,
    pub max_storage_binding: u64,
}

impl std::fmt::Display for AdapterSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {})", self.name, self.backend, self.device_type)
    }
}

/// A device, its queue and the compiled kernels.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    summary: AdapterSummary,
    pipelines: RefCell<HashMap<String, wgpu::ComputePipeline>>,
    kernel_choice: std::cell::Cell<Option<bool>>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext").field("adapter", &self.summary).finish()
    }
}

/// Workgroups to cover `groups` in a 2-D grid within the 65 535-per-dimension limit.
pub(crate) fn grid(groups: u32) -> (u32, u32, u32) {
    const MAX: u32 = 65_535;
    if groups <= MAX {
        (groups.max(1), 1, 1)
    } else {
        (MAX, groups.div_ceil(MAX), 1)
    }
}

impl GpuContext {
    /// Requests an adapter and a device with the adapter's own limits (the
    /// largest buffers it allows). `Err(NoAdapter)` means: use the CPU.
    pub async fn new(options: &GpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let power =
            if options.low_power { wgpu::PowerPreference::LowPower } else { wgpu::PowerPreference::HighPerformance };
        let adapter = instance
            .request_adapter(&wgpu::RequestAdapterOptions { power_preference: power, ..Default::default() })
            .await
            .map_err(|e| Error::NoAdapter(e.to_string()))?;
        let info = adapter.get_info();
        if options.refuse_software && info.device_type == wgpu::DeviceType::Cpu {
            return Err(Error::NoAdapter(format!("only a software adapter ({}) and software was refused", info.name)));
        }
        let limits = adapter.limits();
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("ipaflux"),
                required_limits: limits.clone(),
                ..Default::default()
            })
            .await
            .map_err(|e| Error::Device(e.to_string()))?;
        let summary = AdapterSummary {
            // Browsers may withhold the adapter's name.
            name: if info.name.is_empty() { "WebGPU adapter".into() } else { info.name.clone() },
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
            max_buffer_size: limits.max_buffer_size,
            max_storage_binding: limits.max_storage_buffer_binding_size,
        };
        tracing::info!(adapter = %summary, "webgpu device ready");
        Ok(Self { device, queue, summary, pipelines: RefCell::new(HashMap::new()), kernel_choice: Default::default() })
    }

    /// [`GpuContext::new`], blocking: for native code and tests.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn new_blocking(options: &GpuOptions) -> Result<Self> {
        pollster::block_on(Self::new(options))
    }

    pub fn adapter(&self) -> &AdapterSummary {
        &self.summary
    }

    /// Whether kernels should avoid workgroup memory: on CPU-emulated adapters
    /// (lavapipe) it costs more than it saves (0.94 vs 0.52 GFLOP/s at 512³ on
    /// lavapipe here). [`GpuContext::set_direct_kernels`] overrides; the
    /// parity tests run both variants.
    pub fn prefers_direct_kernels(&self) -> bool {
        match self.kernel_choice.get() {
            Some(direct) => direct,
            // In a browser the adapter type is not reported (wgpu says Cpu for
            // every adapter there), so the browser keeps the tiled kernels.
            None => {
                self.summary.device_type == format!("{:?}", wgpu::DeviceType::Cpu)
                    && self.summary.backend != format!("{:?}", wgpu::Backend::BrowserWebGpu)
            }
        }
    }

    /// Forces the tiled (`false`) or direct (`true`) kernels; `None` decides by adapter type.
    pub fn set_direct_kernels(&self, choice: Option<bool>) {
        self.kernel_choice.set(choice);
    }

    /// The largest buffer one kernel binding may see.
    pub fn max_binding(&self) -> u64 {
        self.summary.max_storage_binding.min(self.summary.max_buffer_size)
    }

    /// A storage buffer holding `data` (f32 or u32 words).
    pub(crate) fn upload(&self, label: &str, data: &[u32]) -> Result<wgpu::Buffer> {
        let bytes = 4 * data.len().max(1) as u64;
        if bytes > self.max_binding() {
            return Err(Error::TooLarge { what: label.into(), bytes, limit: self.max_binding() });
        }
        let contents: &[u8] = if data.is_empty() { &[0; 4] } else { bytemuck::cast_slice(data) };
        Ok(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        }))
    }

    /// An uninitialised storage buffer of `len` f32 values.
    pub(crate) fn scratch(&self, label: &str, len: usize) -> Result<wgpu::Buffer> {
        let bytes = 4 * len.max(1) as u64;
        if bytes > self.max_binding() {
            return Err(Error::TooLarge { what: label.into(), bytes, limit: self.max_binding() });
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// The pipeline for `entry` of `source`, compiled once per `key`.
    fn pipeline(&self, key: &str, source: &str, entry: &str) -> wgpu::ComputePipeline {
        let mut cache = self.pipelines.borrow_mut();
        if let Some(p) = cache.get(key) {
            return p.clone();
        }
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(key),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        });
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        });
        cache.insert(key.to_string(), pipeline.clone());
        pipeline
    }

    /// Runs one dispatch: `params` (u32 words, f32 as bits) at binding 0, then
    /// `buffers` at their binding numbers.
    pub(crate) fn dispatch(
        &self,
        kernel: &Kernel<'_>,
        params: &[u32],
        buffers: &[(u32, &wgpu::Buffer)],
        groups: (u32, u32, u32),
    ) {
        let pipeline = self.pipeline(&kernel.key, kernel.source, kernel.entry);
        let mut words = params.to_vec();
        words.resize(params.len().div_ceil(4).max(1) * 4, 0);
        let uniform = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        entries.extend(
            buffers.iter().map(|(b, buf)| wgpu::BindGroupEntry { binding: *b, resource: buf.as_entire_binding() }),
        );
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.key),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut encoder =
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(&kernel.key) });
        {
            let mut pass = encoder
                .begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(&kernel.key), timestamp_writes: None });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        }
        self.queue.submit([encoder.finish()]);
    }

    /// Copies `len` f32 values out of `buffer`.
    pub(crate) async fn read(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<f32>> {
        let bytes = 4 * len as u64;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder =
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("readback") });
        encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, bytes);
        self.queue.submit([encoder.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| Error::Readback(e.to_string()))?;
        rx.await
            .map_err(|_| Error::Readback("the map callback was dropped".into()))?
            .map_err(|e| Error::Readback(e.to_string()))?;
        let out = {
            let view = staging.slice(..bytes).get_mapped_range().map_err(|e| Error::Readback(e.to_string()))?;
            bytemuck::cast_slice::<u8, f32>(&view).to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// Runs `work` inside WebGPU error scopes: an allocation failure becomes
    /// [`Error::OutOfMemory`], a validation failure [`Error::Validation`],
    /// instead of the device's uncaptured-error handler (a panic natively).
    pub async fn scoped<T>(&self, what: &str, work: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = work();
        let v = validation.pop().await;
        let o = oom.pop().await;
        if let Some(e) = o {
            tracing::warn!(what, error = %e, "webgpu out of memory");
            return Err(Error::OutOfMemory { what: what.into() });
        }
        if let Some(e) = v {
            return Err(Error::Validation { what: what.into(), message: e.to_string() });
        }
        out
    }
}

/// One entry point of one WGSL source; `key` names the compiled variant.
pub(crate) struct Kernel<'a> {
    pub key: String,
    pub source: &'a str,
    pub entry: &'a str,
}
