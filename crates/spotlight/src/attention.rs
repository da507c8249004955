//! Running attention: the entry points, input upload and the checks of caller-owned buffers.
//!
//! Two entry points share one encoder path: [`Engine::attention`] on host slices, and
//! [`Engine::attention_on_buffers`] on GPU buffers the caller owns. Planning is in `plan.rs`,
//! recording the passes in `record.rs`, the public types in `options.rs`.

use wgpu::util::DeviceExt;

use spotlight_reference::{DType, Inputs, Problem, Tensor};

use crate::cache::Paging;
use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{Algorithm, GpuInputs, GpuOutputs, Output, Resident, RunOptions};
use crate::plan::Plan;
use crate::record::padded;

impl Engine {
    /// Uploads a problem's inputs and creates its output buffers (filled with NaN), ready for
    /// [`Engine::attention_on_buffers`] as many times as needed (benchmarks, repeated runs).
    pub fn upload(&self, p: &Problem, inputs: &Inputs<'_>, opts: &RunOptions) -> Result<Resident> {
        let _gl = self.exclusive();
        p.check_inputs(inputs)?;
        self.plan(p, inputs.dtypes(), opts)?;
        Ok(self.upload_unchecked(p, inputs, opts))
    }

    /// [`Engine::upload`] for inputs already checked (pieces of a split problem carry global
    /// sequence lengths that the piece's own shape would reject).
    pub(crate) fn upload_unchecked(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        opts: &RunOptions,
    ) -> Resident {
        let dev = &self.device;
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let upload = |label: &str, bytes: &[u8]| {
            let mut data = bytes.to_vec();
            data.resize(padded(bytes.len() as u64) as usize, 0);
            dev.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &data,
                usage: storage,
            })
        };
        let out_dtype = opts.out_dtype.unwrap_or(inputs.q.dtype());
        let (out, lse, probs) = self.poisoned_outputs(p, out_dtype, opts);
        Resident {
            q: upload("q", inputs.q.as_bytes()),
            k: upload("k", inputs.k.as_bytes()),
            v: upload("v", inputs.v.as_bytes()),
            dtypes: inputs.dtypes(),
            bias: inputs.bias.map(|b| upload("bias", bytemuck::cast_slice(b))),
            mask: inputs.mask.map(|m| upload("mask", m)),
            alibi_slopes: inputs
                .alibi_slopes
                .map(|s| upload("alibi_slopes", bytemuck::cast_slice(s))),
            q_seqlens: inputs
                .q_seqlens
                .map(|s| upload("q_seqlens", bytemuck::cast_slice(s))),
            kv_seqlens: inputs
                .kv_seqlens
                .map(|s| upload("kv_seqlens", bytemuck::cast_slice(s))),
            out,
            out_dtype,
            lse,
            probs,
        }
    }

    /// Runs attention on host data: validates, uploads, computes, downloads. Output buffers are
    /// filled with NaN before the run, so an element a kernel failed to write cannot look valid.
    ///
    /// A problem whose tensors pass the device's binding or buffer limits is cut into pieces
    /// (groups of batch entries × windows of keys) that run one after another and are merged
    /// exactly by their LSE; see [`Engine::estimate`].
    pub fn attention(&self, p: &Problem, inputs: &Inputs<'_>, opts: &RunOptions) -> Result<Output> {
        let _gl = self.exclusive();
        p.check_inputs(inputs)?;
        let opts = self.resolve_coop(p, inputs.dtypes(), opts)?;
        self.coop_check_range(inputs, &opts)?;
        self.scoped(|| self.attention_checked(p, inputs, &opts))
    }

    fn attention_checked(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        opts: &RunOptions,
    ) -> Result<Output> {
        match self.plan(p, inputs.dtypes(), opts) {
            Ok(plan) => {
                let r = self.upload_unchecked(p, inputs, opts);
                self.run_into(p, plan, &r.inputs(), &r.outputs(), None)
            }
            Err(e @ (Error::LimitExceeded { .. } | Error::GridTooLarge { .. })) => {
                // Pieces never run three-pass: say what passes the limit, not that it can't split.
                if opts.probs || opts.algorithm == Algorithm::ThreePass {
                    return Err(e);
                }
                let split = self.split(p, inputs.dtypes(), opts)?;
                self.attention_in_pieces(p, inputs, opts, split)
            }
            Err(e) => Err(e),
        }
    }

    /// Creates poisoned outputs, records and submits the plan, and reads the results back.
    /// Output buffers for `p`, filled with NaN: `(out, lse, probs)`.
    fn poisoned_outputs(
        &self,
        p: &Problem,
        out_dtype: DType,
        opts: &RunOptions,
    ) -> (wgpu::Buffer, Option<wgpu::Buffer>, Option<wgpu::Buffer>) {
        let poisoned = |label: &str, bytes: u64| {
            let words = (padded(bytes) / 4) as usize;
            self.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents: bytemuck::cast_slice(&vec![f32::NAN; words]),
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                })
        };
        (
            poisoned("out", (p.o_elems() * out_dtype.size()) as u64),
            opts.lse.then(|| poisoned("lse", p.lse_elems() as u64 * 4)),
            opts.probs
                .then(|| poisoned("probs", p.probs_elems() as u64 * 4)),
        )
    }

    /// Creates poisoned outputs, records and submits the plan, and reads the results back.
    pub(crate) fn run_and_read(
        &self,
        p: &Problem,
        plan: Plan,
        inputs: &GpuInputs<'_>,
        out_dtype: DType,
        opts: &RunOptions,
        paging: Option<&Paging<'_>>,
    ) -> Result<Output> {
        let (out, lse, probs) = self.poisoned_outputs(p, out_dtype, opts);
        let outputs = GpuOutputs {
            out: &out,
            out_dtype,
            lse: lse.as_ref(),
            probs: probs.as_ref(),
        };
        self.run_into(p, plan, inputs, &outputs, paging)
    }

    /// Records and submits the plan into `outputs`, and reads them back.
    pub(crate) fn run_into(
        &self,
        p: &Problem,
        plan: Plan,
        inputs: &GpuInputs<'_>,
        outputs: &GpuOutputs<'_>,
        paging: Option<&Paging<'_>>,
    ) -> Result<Output> {
        self.check_health()?;
        let (out, out_dtype, lse, probs) =
            (outputs.out, outputs.out_dtype, outputs.lse, outputs.probs);
        let out_bytes = (p.o_elems() * out_dtype.size()) as u64;
        let mut enc = self.device.create_command_encoder(&Default::default());
        self.encode(&mut enc, p, plan, inputs, outputs, paging)?;
        self.queue.submit([enc.finish()]);
        let bytes = self.read_bytes(out, out_bytes)?;
        let out = match out_dtype {
            DType::F32 => Tensor::F32(bytemuck::pod_collect_to_vec(&bytes)),
            DType::F16 => Tensor::F16(bytemuck::pod_collect_to_vec(&bytes)),
            DType::Bf16 => Tensor::Bf16(bytemuck::pod_collect_to_vec(&bytes)),
        };
        let lse = lse
            .as_ref()
            .map(|b| self.read_f32(b, p.lse_elems()))
            .transpose()?;
        let probs = probs
            .as_ref()
            .map(|b| self.read_f32(b, p.probs_elems()))
            .transpose()?;
        Ok(Output {
            out,
            lse,
            probs,
            algorithm: plan.algorithm(),
        })
    }

    /// Records attention on caller-owned GPU buffers into `encoder`; the caller submits it.
    /// Returns the algorithm chosen.
    ///
    /// Checked before anything is recorded: the problem, that the buffers given match what it
    /// declares (presence), their sizes and usages, that no output buffer is also an input or
    /// another output, that `opts.lse` / `opts.probs` / `opts.out_dtype` agree with the output
    /// buffers given, and the device's limits. Not checked (they live on the GPU): the values.
    /// Sequence lengths are clamped to `[0, Lq]` / `[0, Lk]` in the kernels (negative = 0), and
    /// non-finite Q, K, V, bias or slopes follow the semantics (they poison the rows they reach).
    pub fn attention_on_buffers(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        p: &Problem,
        inputs: &GpuInputs<'_>,
        outputs: &GpuOutputs<'_>,
        opts: &RunOptions,
    ) -> Result<Algorithm> {
        let _gl = self.exclusive();
        // The options and the buffers must say the same thing: no silent override.
        for (what, asked, given) in [
            ("lse", opts.lse, outputs.lse.is_some()),
            ("probs", opts.probs, outputs.probs.is_some()),
        ] {
            if asked != given {
                return Err(Error::BadBuffer {
                    what,
                    detail: format!(
                        "RunOptions::{what} is {asked} but {} buffer was given: pass both or neither",
                        if given { "a" } else { "no" }
                    ),
                });
            }
        }
        if let Some(d) = opts.out_dtype
            && d != outputs.out_dtype
        {
            return Err(Error::BadBuffer {
                what: "out",
                detail: format!(
                    "RunOptions::out_dtype is {} but GpuOutputs::out_dtype is {}",
                    d.name(),
                    outputs.out_dtype.name()
                ),
            });
        }
        let opts = RunOptions {
            out_dtype: Some(outputs.out_dtype),
            ..*opts
        };
        self.check_buffers(p, inputs, outputs)?;
        let opts = self.resolve_coop(p, inputs.dtypes, &opts)?;
        let plan = self.plan(p, inputs.dtypes, &opts)?;
        self.check_health()?;
        // Scoped like every operation: a scratch allocation that fails is `OutOfMemory` here,
        // and the engine's reusable scratch is dropped with it.
        self.scoped(|| self.encode(encoder, p, plan, inputs, outputs, None))?;
        Ok(plan.algorithm())
    }

    fn check_buffers(&self, p: &Problem, i: &GpuInputs<'_>, o: &GpuOutputs<'_>) -> Result<()> {
        use wgpu::BufferUsages as U;
        let presence = [
            ("bias", p.bias.is_some(), i.bias.is_some()),
            ("mask", p.mask.is_some(), i.mask.is_some()),
            ("alibi_slopes", p.alibi, i.alibi_slopes.is_some()),
            ("q_seqlens", p.q_seqlens, i.q_seqlens.is_some()),
            ("kv_seqlens", p.kv_seqlens, i.kv_seqlens.is_some()),
        ];
        check_presence(&presence)?;
        let bcast = |b: Option<spotlight_reference::Broadcast>| {
            b.map_or(0, |b| p.broadcast_elems(&b) as u64)
        };
        let need: [(&'static str, Option<&wgpu::Buffer>, u64, U); 11] = [
            (
                "q",
                Some(i.q),
                (p.q_elems() * i.dtypes[0].size()) as u64,
                U::STORAGE,
            ),
            (
                "k",
                Some(i.k),
                (p.k_elems() * i.dtypes[1].size()) as u64,
                U::STORAGE,
            ),
            (
                "v",
                Some(i.v),
                (p.v_elems() * i.dtypes[2].size()) as u64,
                U::STORAGE,
            ),
            ("bias", i.bias, bcast(p.bias) * 4, U::STORAGE),
            ("mask", i.mask, bcast(p.mask), U::STORAGE),
            (
                "alibi_slopes",
                i.alibi_slopes,
                p.q_heads as u64 * 4,
                U::COPY_SRC,
            ),
            ("q_seqlens", i.q_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            ("kv_seqlens", i.kv_seqlens, p.batch as u64 * 4, U::COPY_SRC),
            (
                "out",
                Some(o.out),
                (p.o_elems() * o.out_dtype.size()) as u64,
                U::STORAGE,
            ),
            ("lse", o.lse, p.lse_elems() as u64 * 4, U::STORAGE),
            ("probs", o.probs, p.probs_elems() as u64 * 4, U::STORAGE),
        ];
        check_caller_buffers(&need, &["out", "lse", "probs"])
    }
}

/// Inputs a problem declares against the buffers a call gives: (what, declared, given).
pub(crate) fn check_presence(presence: &[(&'static str, bool, bool)]) -> Result<()> {
    for &(what, declared, given) in presence {
        if declared != given {
            return Err(spotlight_reference::ProblemError::Presence {
                what,
                declared,
                given,
            }
            .into());
        }
    }
    Ok(())
}

/// One caller-owned buffer a call binds: its name, the buffer (`None`: not given), the bytes the
/// problem needs from it and the usage it must have.
pub(crate) type Needed<'a> = (
    &'static str,
    Option<&'a wgpu::Buffer>,
    u64,
    wgpu::BufferUsages,
);

/// Checks caller-owned buffers before any GPU work: each given one is large enough (rounded up
/// to whole words) and has its usage, and no buffer named in `outputs` is the buffer of an
/// input or of an earlier output. An output bound where an input is bound would be read and
/// written in one dispatch (wgpu refuses that later, at submission or in the app's
/// `encoder.finish()`), and two outputs in one buffer would overwrite each other: say it here.
pub(crate) fn check_caller_buffers(need: &[Needed<'_>], outputs: &[&str]) -> Result<()> {
    let is_output = |what: &str| outputs.contains(&what);
    let bound: Vec<(&'static str, &wgpu::Buffer)> = need
        .iter()
        .filter_map(|&(what, buf, _, _)| buf.map(|b| (what, b)))
        .collect();
    for (n, &(what, buf)) in bound.iter().enumerate() {
        if !is_output(what) {
            continue;
        }
        if let Some(&(other, _)) = bound
            .iter()
            .enumerate()
            .find_map(|(m, x)| (m != n && x.1 == buf && (m < n || !is_output(x.0))).then_some(x))
        {
            return Err(Error::BadBuffer {
                what,
                detail: format!(
                    "is the same buffer as {other}: an output must not alias an input or another output"
                ),
            });
        }
    }
    for &(what, buf, bytes, usage) in need {
        let Some(buf) = buf else { continue };
        if buf.size() < padded(bytes) {
            return Err(Error::BadBuffer {
                what,
                detail: format!(
                    "has {} bytes, needs at least {} (rounded up to a multiple of 4)",
                    buf.size(),
                    padded(bytes)
                ),
            });
        }
        if !buf.usage().contains(usage) {
            return Err(Error::BadBuffer {
                what,
                detail: format!("needs usage {usage:?}, has {:?}", buf.usage()),
            });
        }
    }
    Ok(())
}
