//! Timing GPU work: whole submissions ([`Engine::time`]), each compute pass of one submission
//! ([`Engine::time_passes`]), and the streaming-read yardstick ([`Engine::stream_read`]).

use crate::context::Engine;
use crate::error::Result;

/// How a [`Timing`] was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerSource {
    /// GPU timestamp queries around the recorded work.
    GpuTimestamps,
    /// Wall clock around submit and wait (the adapter has no timestamp queries).
    WallClock,
}

/// One timed submission.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub seconds: f64,
    pub source: TimerSource,
}

impl Engine {
    /// Records work with `record`, submits it, waits, and returns how long it took on the GPU:
    /// from timestamp queries written by empty compute passes before and after the work where the
    /// adapter has them, else wall clock around submit and wait.
    pub fn time(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Timing> {
        let _gl = self.exclusive();
        let mut enc = self.device.create_command_encoder(&Default::default());
        if !self.capabilities().timestamp_query {
            let t = std::time::Instant::now();
            record(&mut enc)?;
            self.queue.submit([enc.finish()]);
            self.wait()?;
            return Ok(Timing {
                seconds: t.elapsed().as_secs_f64(),
                source: TimerSource::WallClock,
            });
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("spotlight timer"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let marker = |enc: &mut wgpu::CommandEncoder, begin: Option<u32>, end: Option<u32>| {
            enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("spotlight timer marker"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: begin,
                    end_of_pass_write_index: end,
                }),
            });
        };
        marker(&mut enc, None, Some(0));
        record(&mut enc)?;
        marker(&mut enc, Some(1), None);
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("spotlight timer resolve"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&set, 0..2, &resolved, 0);
        self.queue.submit([enc.finish()]);
        let bytes = self.read_bytes(&resolved, 16)?;
        let ticks: Vec<u64> = bytemuck::pod_collect_to_vec(&bytes);
        let period = self.queue.get_timestamp_period() as f64;
        Ok(Timing {
            seconds: ticks[1].saturating_sub(ticks[0]) as f64 * period * 1e-9,
            source: TimerSource::GpuTimestamps,
        })
    }
}

impl Engine {
    /// Measures the adapter's read bandwidth with a plain streaming compute shader over `bytes`
    /// bytes (rounded to 16): the yardstick for memory-bound kernels such as decoding. Returns
    /// the median timing of `repeats` runs after one warm-up.
    pub fn stream_read(&self, bytes: u64, repeats: usize) -> Result<Timing> {
        let _gl = self.exclusive();
        use wgpu::util::DeviceExt;
        let bytes =
            (bytes.div_ceil(16) * 16).clamp(16, self.capabilities().max_storage_binding / 16 * 16);
        let words = (bytes / 16) as u32;
        let src = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("stream source"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let groups = (words as u64).div_ceil(256 * 8).clamp(1, 65535);
        let sink = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("stream sink"),
            size: groups * 4,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let params = self
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("stream params"),
                contents: bytemuck::cast_slice(&[words, 0, 0, 0]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let kernel = self
            .cache
            .get(&self.device, &crate::kernels::Variant::stream())?;
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("stream"),
            layout: &kernel.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: src.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: sink.as_entire_binding(),
                },
            ],
        });
        let mut times = Vec::new();
        for _ in 0..repeats.max(1) + 1 {
            let t = self.time(|enc| {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&kernel.pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(groups as u32, 1, 1);
                Ok(())
            })?;
            times.push(t);
        }
        times.remove(0);
        times.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
        Ok(times[times.len() / 2])
    }
}

/// GPU time of one kernel's compute passes in a submission timed by [`Engine::time_passes`].
#[derive(Clone, Debug, PartialEq)]
pub struct PassTime {
    /// The kernel: its shader's name (`flash_rows`, `flash`, `merge`, `pack`, `scores`,
    /// `softmax`, `pv`, `backward_kv`, ...).
    pub kernel: &'static str,
    /// The sum over its passes, from timestamps written at the beginning and end of each.
    pub seconds: f64,
    /// How many passes (one dispatch each) it ran.
    pub passes: usize,
}

/// One submission timed whole and per compute pass.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The whole submission, as [`Engine::time`] measures it.
    pub total: Timing,
    /// Per kernel, in the order each first ran; empty where the adapter has no timestamp
    /// queries.
    pub kernels: Vec<PassTime>,
    /// Passes that got no timestamps: all of them without timestamp queries, those past the
    /// first [`PASS_QUERIES`]` / 2` otherwise.
    pub untimed_passes: usize,
}

/// Timestamp queries of one [`Engine::time_passes`] call: two per pass.
pub const PASS_QUERIES: u32 = 1024;

/// The per-pass timestamps of one [`Engine::time_passes`] call, armed for the calling thread
/// only (another thread's work on the same engine is not counted in).
pub(crate) struct PassTimer {
    thread: std::thread::ThreadId,
    set: Option<wgpu::QuerySet>,
    kernels: Vec<&'static str>,
    untimed: usize,
}

impl Engine {
    /// The timestamp writes for the next compute pass of `kernel`, where a profile is being
    /// taken on this thread and has room (`None` otherwise).
    pub(crate) fn pass_timestamps(&self, kernel: &'static str) -> Option<(wgpu::QuerySet, u32)> {
        let mut slot = self.pass_timer.lock().unwrap_or_else(|e| e.into_inner());
        let t = slot.as_mut()?;
        if t.thread != std::thread::current().id() {
            return None;
        }
        match &t.set {
            Some(set) if (t.kernels.len() as u32 + 1) * 2 <= PASS_QUERIES => {
                let at = t.kernels.len() as u32 * 2;
                t.kernels.push(kernel);
                Some((set.clone(), at))
            }
            _ => {
                t.untimed += 1;
                None
            }
        }
    }

    /// Like [`Engine::time`], and also the GPU time of each compute pass the engine records
    /// (summed per kernel). Per-pass timestamps add a little work between passes, so time
    /// repeated calls with [`Engine::time`] and take one profile beside them.
    pub fn time_passes(
        &self,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Profile> {
        let _gl = self.exclusive();
        let set = self.capabilities().timestamp_query.then(|| {
            self.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("spotlight pass timer"),
                ty: wgpu::QueryType::Timestamp,
                count: PASS_QUERIES,
            })
        });
        {
            let mut slot = self.pass_timer.lock().unwrap_or_else(|e| e.into_inner());
            if slot.is_some() {
                return Err(crate::Error::Gpu(
                    "another thread is taking a profile on this engine (one at a time)".into(),
                ));
            }
            *slot = Some(PassTimer {
                thread: std::thread::current().id(),
                set,
                kernels: Vec::new(),
                untimed: 0,
            });
        }
        // Disarmed however the call ends, a panic in `record` included.
        struct Disarm<'a>(&'a Engine);
        impl Drop for Disarm<'_> {
            fn drop(&mut self) {
                let slot = &self.0.pass_timer;
                slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
        }
        let disarm = Disarm(self);
        let total = self.time(record);
        let timer = self
            .pass_timer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("the pass timer stays armed during the call");
        drop(disarm);
        let total = total?;
        let mut kernels: Vec<PassTime> = Vec::new();
        if let Some(set) = timer.set.as_ref().filter(|_| !timer.kernels.is_empty()) {
            let n = timer.kernels.len() as u32 * 2;
            let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("spotlight pass timer resolve"),
                size: n as u64 * 8,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.resolve_query_set(set, 0..n, &resolved, 0);
            self.queue.submit([enc.finish()]);
            let ticks: Vec<u64> =
                bytemuck::pod_collect_to_vec(&self.read_bytes(&resolved, n as u64 * 8)?);
            let period = self.queue.get_timestamp_period() as f64 * 1e-9;
            for (i, &kernel) in timer.kernels.iter().enumerate() {
                let seconds = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
                match kernels.iter_mut().find(|k| k.kernel == kernel) {
                    Some(k) => {
                        k.seconds += seconds;
                        k.passes += 1;
                    }
                    None => kernels.push(PassTime {
                        kernel,
                        seconds,
                        passes: 1,
                    }),
                }
            }
        }
        Ok(Profile {
            total,
            kernels,
            untimed_passes: timer.untimed,
        })
    }
}
