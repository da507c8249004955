//! The engine: adapter, device, queue, capabilities and the pipeline cache, built once.
//!
//! This module owns the wgpu calls that change between wgpu releases (instance, adapter, device,
//! poll, map); the rest of the crate speaks in its own types.

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::kernels::PipelineCache;

/// Self-test results of the cooperative-matrix kernel, per (D, Dv, dtypes).
pub(crate) type CoopChecks =
    std::collections::HashMap<(usize, usize, [spotlight_reference::DType; 3]), bool>;

/// How long a readback may take before it is reported as an error rather than a hang.
const MAP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// What the adapter offers that Spotlight cares about.
#[derive(Clone, Debug)]
pub struct Capabilities {
    pub shader_f16: bool,
    pub subgroups: bool,
    pub subgroup_min_size: u32,
    pub subgroup_max_size: u32,
    pub cooperative_matrix: bool,
    pub timestamp_query: bool,
    pub max_storage_binding: u64,
    pub max_buffer_size: u64,
    pub max_workgroup_memory: u32,
    pub max_invocations: u32,
    pub max_workgroups_per_dim: u32,
    pub max_storage_buffers_per_stage: u32,
    pub max_uniform_buffers_per_stage: u32,
    /// Edge of the square f16 x f16 -> f32 cooperative-matrix configuration the matrix-unit
    /// kernel uses: 16 (NVIDIA, AMD, Intel) or 8 (Apple, Mesa >= 26 lavapipe), the larger where
    /// both are offered; 0 = none. Known only for engines made by [`Engine::with_options`] /
    /// [`Engine::new`], which query the adapter.
    pub coop_edge: u32,
    /// Key tiles one fused-kernel workgroup may stream before the key range must be split into
    /// chunks (merged afterwards); `None` = no limit. Mesa's llvmpipe/lavapipe (22.x) ends every
    /// loop once an invocation has run about 65 535 loop iterations in total, silently: measured
    /// here, the fused kernel went wrong past 219 tiles of 32 keys at D=64 and past 206 tiles of
    /// 16 keys at D=128, so on llvmpipe a workgroup streams at most 64 tiles.
    pub max_key_tiles_per_workgroup: Option<u32>,
}

impl Capabilities {
    fn new(features: wgpu::Features, limits: &wgpu::Limits, info: &wgpu::AdapterInfo) -> Self {
        Capabilities {
            shader_f16: features.contains(wgpu::Features::SHADER_F16),
            subgroups: features.contains(wgpu::Features::SUBGROUP),
            subgroup_min_size: info.subgroup_min_size,
            subgroup_max_size: info.subgroup_max_size,
            cooperative_matrix: features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX),
            timestamp_query: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            max_storage_binding: limits.max_storage_buffer_binding_size,
            max_buffer_size: limits.max_buffer_size,
            max_workgroup_memory: limits.max_compute_workgroup_storage_size,
            max_invocations: limits.max_compute_invocations_per_workgroup,
            max_workgroups_per_dim: limits.max_compute_workgroups_per_dimension,
            max_storage_buffers_per_stage: limits.max_storage_buffers_per_shader_stage,
            max_uniform_buffers_per_stage: limits.max_uniform_buffers_per_shader_stage,
            coop_edge: 0,
            max_key_tiles_per_workgroup: (info.driver.contains("llvmpipe")
                || info.name.contains("llvmpipe"))
            .then_some(64),
        }
    }
}

/// How to choose the adapter. The defaults read `WGPU_BACKEND` and `WGPU_ADAPTER_NAME`.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Backends to consider (default: `WGPU_BACKEND`, else all).
    pub backends: Option<wgpu::Backends>,
    /// Case-insensitive substring of the adapter name (default: `WGPU_ADAPTER_NAME`).
    pub adapter_name: Option<String>,
}

/// The Spotlight context: one per device, shared freely between threads.
pub struct Engine {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    caps: Capabilities,
    pub(crate) cache: PipelineCache,
    gpu_error: Arc<Mutex<Option<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    why: String,
    native_f16: bool,
    use_subgroups: bool,
    /// Whether `auto` may pick the matrix-unit kernel (default: not on CPU adapters, where the
    /// matrix units are emulated: [`Engine::with_auto_matrix_units`]).
    pub(crate) auto_matrix_units: bool,
    /// The row kernel's P·V branches on finite V ([`Engine::with_finite_v_branch`]).
    pub(crate) finite_v_branch: bool,
    /// Results of the cooperative-matrix kernel's self-test, per (D, Dv, dtypes).
    pub(crate) coop_checked: Mutex<CoopChecks>,
    /// On the GL backend, one operation at a time (see [`Engine::exclusive`]).
    gl_serial: Option<parking_lot::ReentrantMutex<()>>,
    /// Unique per engine in this process: objects holding GPU memory of one engine (a
    /// [`crate::KvCache`]) record it and refuse to be used with another.
    id: u64,
    scopes_entered: std::sync::atomic::AtomicU64,
    /// The per-pass timestamps of a profile being taken ([`Engine::time_passes`]).
    pub(crate) pass_timer: Mutex<Option<crate::timing::PassTimer>>,
    /// Scratch reused across calls ([`crate::record::Slot`]).
    pub(crate) scratch_pool: crate::record::ScratchPool,
}

fn instance(backends: wgpu::Backends) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = backends;
    wgpu::Instance::new(desc)
}

fn env_backends(opts: &EngineOptions) -> wgpu::Backends {
    opts.backends
        .or_else(wgpu::Backends::from_env)
        .unwrap_or(wgpu::Backends::all())
}

fn env_adapter_name(opts: &EngineOptions) -> Option<String> {
    opts.adapter_name
        .clone()
        .or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok())
        .filter(|s| !s.is_empty())
}

/// Every adapter wgpu sees under `opts`, with the one [`Engine::with_options`] would choose
/// marked, and why. For `spotlight info`.
pub fn adapter_report(opts: &EngineOptions) -> (Vec<wgpu::AdapterInfo>, Option<usize>, String) {
    let backends = env_backends(opts);
    let inst = instance(backends);
    let adapters = pollster::block_on(inst.enumerate_adapters(backends));
    let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
    let (chosen, why) = choose(&infos, opts);
    (infos, chosen, why)
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn choose(infos: &[wgpu::AdapterInfo], opts: &EngineOptions) -> (Option<usize>, String) {
    if let Some(name) = env_adapter_name(opts) {
        let needle = name.to_lowercase();
        let hit = infos
            .iter()
            .position(|i| i.name.to_lowercase().contains(&needle));
        let why = match hit {
            Some(_) => format!("its name matches WGPU_ADAPTER_NAME='{name}'"),
            None => format!("no adapter name contains WGPU_ADAPTER_NAME='{name}'"),
        };
        return (hit, why);
    }
    let best = (0..infos.len()).min_by_key(|&i| rank(infos[i].device_type));
    let why = "high-performance preference: discrete, then integrated, virtual, other, CPU".into();
    (best, why)
}

impl Engine {
    /// Creates an engine on the adapter chosen from `WGPU_BACKEND`, `WGPU_ADAPTER_NAME` and a
    /// high-performance preference.
    pub fn new() -> Result<Self> {
        Self::with_options(&EngineOptions::default())
    }

    /// Creates an engine with explicit adapter choices.
    pub fn with_options(opts: &EngineOptions) -> Result<Self> {
        let backends = env_backends(opts);
        let inst = instance(backends);
        let adapters = pollster::block_on(inst.enumerate_adapters(backends));
        let infos: Vec<wgpu::AdapterInfo> = adapters.iter().map(|a| a.get_info()).collect();
        let (chosen, why) = choose(&infos, opts);
        let Some(index) = chosen else {
            let detail = if infos.is_empty() {
                format!(" (backends {backends:?})")
            } else {
                format!(": {why}")
            };
            return Err(Error::NoAdapter { detail });
        };
        let adapter = &adapters[index];
        let info = adapter.get_info();
        let wanted =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP;
        let features = adapter.features() & wanted;
        let limits = adapter.limits();
        // Matrix units: only when the adapter offers the experimental feature with f16 and a
        // square f16 x f16 -> f32 configuration WGSL can spell (16x16x16 or 8x8x8).
        let coop = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        let coop_edge = crate::coop::coop_edge(&adapter.cooperative_matrix_properties());
        let want_coop = coop_edge != 0
            && adapter.features().contains(coop)
            && features.contains(wgpu::Features::SHADER_F16);
        let request = |with_coop: bool| {
            pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
                label: Some("spotlight"),
                required_features: if with_coop { features | coop } else { features },
                required_limits: limits.clone(),
                // SAFETY: experimental features are requested only when the adapter reports the
                // feature; the kernels that use it are validated by naga like every other.
                experimental_features: if with_coop {
                    unsafe { wgpu::ExperimentalFeatures::enabled() }
                } else {
                    wgpu::ExperimentalFeatures::disabled()
                },
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            }))
        };
        // A refused experimental request falls back to the plain device.
        let result = match request(want_coop) {
            Err(e) if want_coop => {
                log::warn!("device with cooperative matrices refused ({e}); continuing without");
                request(false)
            }
            other => other,
        };
        let (device, queue) = result.map_err(|e| Error::RequestDevice {
            adapter: info.name.clone(),
            reason: e.to_string(),
        })?;
        let mut engine = Self::build(device, queue, info, why);
        if want_coop && engine.device.features().contains(coop) {
            engine.caps.coop_edge = coop_edge;
        }
        // We own this device, so errors that escape a scope are recorded, not panicked on.
        let slot = engine.gpu_error.clone();
        engine
            .device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                log::error!("uncaptured wgpu error: {e}");
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
            }));
        Ok(engine)
    }

    /// Wraps a device and queue an application already has. Spotlight uses only the features
    /// and limits that device was created with.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Self {
        let info = device.adapter_info();
        Self::build(device, queue, info, "provided by the application".into())
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        why: String,
    ) -> Self {
        let caps = Capabilities::new(device.features(), &device.limits(), &info);
        let caps_f16 = caps.shader_f16;
        let lost = Arc::new(Mutex::new(None));
        let slot = lost.clone();
        device.set_device_lost_callback(move |reason, msg| {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{reason:?}: {msg}"));
        });
        Engine {
            device,
            queue,
            caps,
            cache: PipelineCache::default(),
            scratch_pool: Default::default(),
            gpu_error: Arc::new(Mutex::new(None)),
            lost,
            why,
            native_f16: caps_f16,
            use_subgroups: true,
            auto_matrix_units: info.device_type != wgpu::DeviceType::Cpu,
            finite_v_branch: skips_untaken_branches(&info),
            coop_checked: Mutex::new(Default::default()),
            gl_serial: (info.backend == wgpu::Backend::Gl)
                .then(|| parking_lot::ReentrantMutex::new(())),
            info,
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            scopes_entered: Default::default(),
            pass_timer: Mutex::new(None),
        }
    }

    /// This engine's identity within the process (see [`crate::KvCache`]).
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Held for the whole of every public GPU operation on the GL backend. wgpu's GL backend
    /// shares one GL context behind a lock that panics after waiting 6 s (wgpu-hal
    /// `CONTEXT_LOCK_TIMEOUT_SECS`), and a readback there holds that lock until the GPU is done:
    /// one thread's long attention made another thread's call panic (measured on Mesa llvmpipe).
    /// Engine operations therefore queue here, without a time limit, instead. Re-entrant, so an
    /// operation that calls another holds it once. Other backends run operations concurrently.
    pub(crate) fn exclusive(&self) -> Option<parking_lot::ReentrantMutexGuard<'_, ()>> {
        self.gl_serial.as_ref().map(|m| m.lock())
    }

    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Why this adapter was chosen.
    pub fn chosen_because(&self) -> &str {
        &self.why
    }

    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// How many pipelines this engine has built (each variant once).
    pub fn pipelines_built(&self) -> usize {
        self.cache.builds()
    }

    /// Treats storage bindings (and buffers) as limited to at most `bytes`: problems past it are
    /// cut into pieces as on an adapter with that limit. For applications that want smaller
    /// allocations, and for tests of the splitting on any adapter.
    pub fn with_binding_limit(mut self, bytes: u64) -> Self {
        self.caps.max_storage_binding = self.caps.max_storage_binding.min(bytes.max(256));
        self.caps.max_buffer_size = self.caps.max_buffer_size.min(bytes.max(256));
        self
    }

    /// Reads f16 tensors as packed u32 words even where the device has `SHADER_F16` (the
    /// fallback every adapter without it uses; results are identical).
    pub fn with_packed_f16(mut self) -> Self {
        self.native_f16 = false;
        self
    }

    /// Does not use subgroup operations even where the device has them (the path every adapter
    /// without them takes; results are identical).
    pub fn without_subgroups(mut self) -> Self {
        self.use_subgroups = false;
        self
    }

    /// Whether `auto` may pick the matrix-unit kernel (`flash-coop`) where it can run and its
    /// self-test passed. The default is yes on GPUs and no on CPU adapters: there the matrix
    /// units are emulated, and on Mesa 26.2 lavapipe the scalar row kernel (`flash`) ran the
    /// same f16 problems 3-5x faster (README, Performance). A forced `flash-coop` runs either way.
    pub fn with_auto_matrix_units(mut self, on: bool) -> Self {
        self.auto_matrix_units = on;
        self
    }

    /// Whether `auto` may pick the matrix-unit kernel ([`Engine::with_auto_matrix_units`]).
    pub fn auto_matrix_units(&self) -> bool {
        self.auto_matrix_units
    }

    /// Whether the row kernel's P·V (the forward on CPU adapters) takes its branch on finite V:
    /// steps whose V vectors are all finite skip the selects that keep a zero weight from
    /// multiplying an inf or NaN, and only steps with one run them; both sides take the products
    /// by the same chain of `fma`, so where the compiler fuses every `fma` (Mesa 26's llvmpipe)
    /// a step's result does not depend on the side it took (up to the sign of an exact zero).
    /// The form without the branch multiplies and adds separately: the two forms agree to f32
    /// rounding, not bit for bit. The default is yes where the driver is known to skip the side
    /// of a branch no lane takes: llvmpipe from Mesa 26 (measured on 26.2.6: 1,1024,2,64 10.5 ->
    /// 8.5 ms, and 8.7 -> 7.3 with the fused multiply-adds), and no elsewhere: Mesa 22's llvmpipe
    /// runs both sides of every branch, and there the selects cost nothing measurable (README,
    /// Performance).
    pub fn with_finite_v_branch(mut self, on: bool) -> Self {
        self.finite_v_branch = on;
        self
    }

    /// Whether the row kernel branches on finite V ([`Engine::with_finite_v_branch`]).
    pub fn finite_v_branch(&self) -> bool {
        self.finite_v_branch
    }

    /// Whether the fused kernel may reduce rows of `tpr` threads with subgroup shuffles: the
    /// device has subgroups and every subgroup size it may use is a multiple of `tpr`
    /// (lavapipe: 8; NVIDIA: 32; sizes are powers of two).
    pub(crate) fn subgroup_rows(&self, tpr: u32) -> bool {
        let c = &self.caps;
        self.uses_subgroups()
            && c.subgroup_min_size >= tpr
            && c.subgroup_min_size.is_multiple_of(tpr)
    }

    /// Whether kernels may use subgroup operations (the device has them and they are not
    /// turned off with [`Engine::without_subgroups`]).
    pub(crate) fn uses_subgroups(&self) -> bool {
        self.use_subgroups && self.caps.subgroups
    }

    /// The lanes of the row kernels ([`crate::plan::Target::row_lanes`]).
    pub(crate) fn row_lanes(&self) -> Option<u32> {
        self.target().row_lanes()
    }

    /// The row kernels' rows per workgroup: the caller's (`rows_per_workgroup`, checked against
    /// the kernel's `allowed` counts) or `default` (the kernel's own choice:
    /// [`crate::kernels::FlashTiles::row_count`] and
    /// [`crate::kernels::FlashTiles::backward_row_count`]).
    pub(crate) fn row_count(
        asked: Option<u32>,
        allowed: &[u32],
        default: u32,
    ) -> std::result::Result<u32, String> {
        match asked {
            Some(r) if allowed.contains(&r) => Ok(r),
            Some(r) => Err(format!(
                "rows_per_workgroup = {r}: the row kernels take {allowed:?}"
            )),
            None => Ok(default),
        }
    }

    /// Whether this is a CPU adapter (lavapipe, llvmpipe, WARP, SwiftShader), where the row
    /// kernels are the default.
    pub(crate) fn is_cpu(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// Whether kernels read f16 tensors natively (`SHADER_F16`).
    pub fn native_f16(&self) -> bool {
        self.native_f16
    }

    /// A one-line description: adapter, backend, type, driver.
    pub fn describe(&self) -> String {
        let i = &self.info;
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            i.name, i.backend, i.device_type, i.driver, i.driver_info
        )
    }

    /// Returns an error if the device was lost or reported an uncaptured error.
    pub(crate) fn check_health(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(Error::DeviceLost(msg));
        }
        if let Some(msg) = self
            .gpu_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            return Err(Error::Gpu(msg));
        }
        Ok(())
    }

    /// Runs `f` inside error scopes, so that an allocation failure or a validation error during
    /// it comes back as a typed error ([`Error::OutOfMemory`], [`Error::Gpu`]) instead of
    /// reaching the device's uncaptured-error handler.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.scopes_entered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let result = f();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        if oom.is_some() || validation.is_some() || result.is_err() {
            // A pooled scratch buffer created inside may be the failure: start afresh.
            self.scratch_pool.clear();
        }
        if let Some(e) = oom {
            return Err(Error::OutOfMemory(e.to_string()));
        }
        if let Some(e) = validation {
            return Err(Error::Gpu(e.to_string()));
        }
        result
    }

    /// How many operations have run inside the error scopes that turn an allocation failure into
    /// [`Error::OutOfMemory`] (for the tests that check each public operation does).
    #[doc(hidden)]
    pub fn error_scopes_entered(&self) -> u64 {
        self.scopes_entered
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        let _gl = self.exclusive();
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::Gpu(e.to_string()))?;
        self.check_health()
    }

    /// Copies `size` bytes of `buffer` (which must have `COPY_SRC`) back to the host.
    pub fn read_bytes(&self, buffer: &wgpu::Buffer, size: u64) -> Result<Vec<u8>> {
        let _gl = self.exclusive();
        let size4 = size.div_ceil(4) * 4;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("spotlight readback"),
            size: size4.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buffer, 0, &staging, 0, size4);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        // Another thread's poll may be the one that runs our callback, after our own poll has
        // returned; so wait on the callback itself, polling again until it arrives.
        let deadline = std::time::Instant::now() + MAP_TIMEOUT;
        loop {
            self.wait()?;
            match rx.recv_timeout(std::time::Duration::from_millis(5)) {
                Ok(Ok(())) => break,
                Ok(Err(e)) => return Err(Error::Gpu(format!("mapping a readback buffer: {e}"))),
                Err(_) if std::time::Instant::now() < deadline => continue,
                Err(_) => {
                    return Err(Error::Gpu(format!(
                        "readback did not complete within {MAP_TIMEOUT:?}"
                    )));
                }
            }
        }
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| Error::Gpu(format!("mapped range: {e}")))?;
        let bytes = view[..size as usize].to_vec();
        drop(view);
        staging.unmap();
        Ok(bytes)
    }

    /// Reads `n` f32 values.
    pub fn read_f32(&self, buffer: &wgpu::Buffer, n: usize) -> Result<Vec<f32>> {
        let bytes = self.read_bytes(buffer, 4 * n as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}

/// Whether the adapter's compiler is known to skip the side of a branch that no lane takes:
/// llvmpipe (lavapipe, and llvmpipe through GL) from Mesa 26, read from the driver strings
/// ("Mesa 26.2.6-1 (LLVM 22.1.8)"). Mesa 22.3's llvmpipe runs both sides under a lane mask; the
/// releases between were not measured, so they keep the branch-free form.
fn skips_untaken_branches(info: &wgpu::AdapterInfo) -> bool {
    info.device_type == wgpu::DeviceType::Cpu
        && llvmpipe_from_mesa(
            &format!("{} {} {}", info.name, info.driver, info.driver_info),
            26,
        )
}

/// Whether driver strings name llvmpipe from Mesa `major` on.
fn llvmpipe_from_mesa(text: &str, major: u32) -> bool {
    text.contains("llvmpipe") && mesa_major(text).is_some_and(|m| m >= major)
}

/// The major version after the word "Mesa" in a driver string.
fn mesa_major(text: &str) -> Option<u32> {
    let rest = &text[text.find("Mesa ")? + 5..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod driver_tests {
    use super::{llvmpipe_from_mesa, mesa_major};

    #[test]
    fn mesa_versions_read_from_driver_strings() {
        // lavapipe's driver_info, llvmpipe through GL, a development build, no Mesa at all.
        assert_eq!(mesa_major("Mesa 26.2.6-1 (LLVM 22.1.8)"), Some(26));
        assert_eq!(mesa_major("4.5 (Core Profile) Mesa 22.3.6"), Some(22));
        assert_eq!(mesa_major("Mesa 26.0.0-devel (git-1234)"), Some(26));
        assert_eq!(mesa_major("NVIDIA 550.54.14"), None);
        assert_eq!(mesa_major("Mesa x"), None);
        let lvp26 = "llvmpipe (LLVM 22.1.8, 256 bits) llvmpipe Mesa 26.2.6-1 (LLVM 22.1.8)";
        let lvp22 = "llvmpipe (LLVM 15.0.6, 256 bits) llvmpipe Mesa 22.3.6 (LLVM 15.0.6)";
        assert!(llvmpipe_from_mesa(lvp26, 26));
        assert!(!llvmpipe_from_mesa(lvp22, 26));
        assert!(!llvmpipe_from_mesa("AMD Radeon radv Mesa 26.2.6", 26));
    }
}
