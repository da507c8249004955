//! Problems larger than the device's limits: cut into pieces that fit, run one after another
//! (each its own submission), and merged exactly.
//!
//! A piece is a group of batch entries (batch splits need no merging: outputs are
//! batch-contiguous in both layouts) times a window of keys. Key windows keep global key
//! numbering on the GPU (`key_base`, `kv_total` in the parameters), so causal alignment, windows,
//! ALiBi distances and sequence lengths mean exactly what they mean unsplit; the partial results
//! of the windows are merged by their LSE on the host (`spotlight_reference::merge`, in f64;
//! [`Engine::merge`] is the same operation on the GPU).

use std::ops::Range;

use spotlight_reference::{DType, Inputs, Problem, Tensor, TensorRef};

use crate::attention::{Algorithm, Output, RunOptions};
use crate::context::Engine;
use crate::error::{Error, Result};

/// How a problem is cut: batch entries per group and keys per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub batch_group: usize,
    pub key_window: usize,
}

impl Split {
    /// Number of pieces for `p`.
    pub fn pieces(&self, p: &Problem) -> usize {
        p.batch.div_ceil(self.batch_group) * p.kv_len.div_ceil(self.key_window)
    }
}

/// Device memory a run needs, before it allocates anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Bytes of device buffers alive at once (the largest piece when split).
    pub device_bytes: u64,
    /// Pieces the problem runs in (1 = not split).
    pub pieces: usize,
    /// The cut, when split.
    pub split: Option<Split>,
}

fn slice(t: TensorRef<'_>, ranges: &[Range<usize>]) -> Tensor {
    fn cat<T: Copy>(x: &[T], ranges: &[Range<usize>]) -> Vec<T> {
        ranges
            .iter()
            .flat_map(|r| x[r.clone()].iter().copied())
            .collect()
    }
    match t {
        TensorRef::F32(x) => Tensor::F32(cat(x, ranges)),
        TensorRef::F16(x) => Tensor::F16(cat(x, ranges)),
        TensorRef::Bf16(x) => Tensor::Bf16(cat(x, ranges)),
    }
}

/// Element ranges of keys `keys` of batch entries `batch` of a K or V tensor.
fn kv_ranges(
    p: &Problem,
    dim: usize,
    batch: Range<usize>,
    keys: Range<usize>,
) -> Vec<Range<usize>> {
    let s = p.layout.strides(p.kv_len, p.kv_heads, dim);
    let mut out = Vec::new();
    for b in batch {
        match p.layout {
            spotlight_reference::Layout::Bshd => {
                out.push(s.index(b, keys.start, 0, 0)..s.index(b, keys.end, 0, 0));
            }
            spotlight_reference::Layout::Bhsd => {
                for h in 0..p.kv_heads {
                    out.push(
                        s.index(b, keys.start, h, 0)
                            ..s.index(b, keys.start, h, 0) + keys.len() * dim,
                    );
                }
            }
        }
    }
    out
}

impl Engine {
    /// The smallest binding or buffer limit.
    fn binding_limit(&self) -> u64 {
        let c = self.capabilities();
        c.max_storage_binding.min(c.max_buffer_size)
    }

    /// How to cut `p` so every piece fits, or why it cannot be cut.
    pub(crate) fn split(&self, p: &Problem, opts: &RunOptions) -> Result<Split> {
        let limit = self.binding_limit();
        let refuse = |why: String, bytes: u64| Error::LimitExceeded {
            what: why,
            bytes,
            limit_name: "max_storage_buffer_binding_size",
            limit,
        };
        if opts.probs || opts.algorithm == Algorithm::ThreePass {
            return Err(refuse(
                "the three-pass score matrix cannot be split; use flash or split-k".into(),
                p.probs_elems() as u64 * 4,
            ));
        }
        if p.bias.is_some() || p.mask.is_some() {
            let b = p.bias.or(p.mask).expect("one is present");
            return Err(refuse(
                "a problem with a bias or mask that needs splitting (splitting those is not supported yet)".into(),
                (b.batch * b.heads * p.q_len * p.kv_len) as u64 * 4,
            ));
        }
        // Per batch entry: Q and O (f32 scratch at worst) and the LSE; per key of one entry: K + V.
        let per_b = ((p.q_len * p.q_heads * p.head_dim.max(p.v_head_dim)) as u64 * 4).max(1);
        if per_b > limit {
            return Err(refuse(
                format!(
                    "one batch entry's queries or outputs ({} rows of {} heads); splitting rows is not supported",
                    p.q_len, p.q_heads
                ),
                per_b,
            ));
        }
        let per_key = (p.kv_heads * p.head_dim.max(p.v_head_dim)) as u64 * 4;
        let batch_group = ((limit / per_b) as usize).clamp(1, p.batch);
        // Leave room for the fused kernel's partial outputs: windows of whole 64-key blocks.
        let keys = (limit / (batch_group as u64 * per_key)) as usize;
        let key_window = (keys / 64 * 64)
            .min(p.kv_len.div_ceil(64) * 64)
            .max(64)
            .min(keys.max(1));
        if keys == 0 {
            return Err(refuse("one key of one batch entry".into(), per_key));
        }
        Ok(Split {
            batch_group,
            key_window,
        })
    }

    /// Device memory `p` needs with `opts`, and whether (and how) it would be split; nothing is
    /// allocated. Errors when it cannot fit even in pieces, with the numbers.
    pub fn estimate(&self, p: &Problem, opts: &RunOptions) -> Result<Estimate> {
        p.validate()?;
        let bytes = |p: &Problem| -> Result<u64> {
            let plan = self.plan(p, opts)?;
            Ok(self.plan_bytes(p, plan, opts))
        };
        match self.plan(p, opts) {
            Ok(_) => Ok(Estimate {
                device_bytes: bytes(p)?,
                pieces: 1,
                split: None,
            }),
            Err(Error::LimitExceeded { .. }) => {
                let split = self.split(p, opts)?;
                let mut piece = p.clone();
                piece.batch = split.batch_group;
                piece.kv_len = split.key_window.min(p.kv_len);
                Ok(Estimate {
                    device_bytes: bytes(&piece)?,
                    pieces: split.pieces(p),
                    split: Some(split),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Runs `p` piece by piece (see the module docs).
    pub(crate) fn attention_in_pieces(
        &self,
        p: &Problem,
        inputs: &Inputs<'_>,
        opts: &RunOptions,
        split: Split,
    ) -> Result<Output> {
        let out_dtype = opts.out_dtype.unwrap_or(inputs.q.dtype());
        // Key windows need the global key numbering of flash and split-k.
        let algorithm = match opts.algorithm {
            Algorithm::SplitK => Algorithm::SplitK,
            _ => Algorithm::Flash,
        };
        let piece_opts = RunOptions {
            lse: true,
            probs: false,
            out_dtype: Some(DType::F32),
            algorithm,
            ..*opts
        };
        let mut out = vec![0.0f32; p.o_elems()];
        let mut lse = vec![f32::NEG_INFINITY; p.lse_elems()];
        let mut algorithm = algorithm;
        let q_per_b = p.q_len * p.q_heads * p.head_dim;
        let o_per_b = p.q_len * p.q_heads * p.v_head_dim;
        let lse_per_b = p.q_heads * p.q_len;
        for b0 in (0..p.batch).step_by(split.batch_group) {
            let batch = b0..(b0 + split.batch_group).min(p.batch);
            let nb = batch.len();
            let q = slice(
                inputs.q,
                std::slice::from_ref(&(b0 * q_per_b..batch.end * q_per_b)),
            );
            let q_lens = inputs.q_seqlens.map(|l| l[batch.clone()].to_vec());
            let kv_lens = inputs.kv_seqlens.map(|l| l[batch.clone()].to_vec());
            let mut parts: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
            let mut group = p.clone();
            group.batch = nb;
            for j0 in (0..p.kv_len).step_by(split.key_window) {
                let keys = j0..(j0 + split.key_window).min(p.kv_len);
                let mut piece = group.clone();
                piece.kv_len = keys.len();
                let k = slice(
                    inputs.k,
                    &kv_ranges(p, p.head_dim, batch.clone(), keys.clone()),
                );
                let v = slice(
                    inputs.v,
                    &kv_ranges(p, p.v_head_dim, batch.clone(), keys.clone()),
                );
                let piece_inputs = Inputs {
                    q: q.as_ref(),
                    k: k.as_ref(),
                    v: v.as_ref(),
                    bias: None,
                    mask: None,
                    alibi_slopes: inputs.alibi_slopes,
                    q_seqlens: q_lens.as_deref(),
                    kv_seqlens: kv_lens.as_deref(),
                };
                let mut plan = self.plan(&piece, &piece_opts)?;
                plan.window = Some((j0 as u32, p.kv_len as u32));
                let r = self.upload_unchecked(&piece, &piece_inputs, &piece_opts);
                let o = self.run_into(&piece, plan, &r.inputs(), &r.outputs(), None)?;
                algorithm = o.algorithm;
                parts.push((o.out.to_f32_vec(), o.lse.expect("lse was asked for")));
            }
            let refs: Vec<(&[f32], &[f32])> = parts
                .iter()
                .map(|(o, l)| (o.as_slice(), l.as_slice()))
                .collect();
            // The windows' results are on the host already; merging them there (in f64) needs no
            // buffer of all parts at once, which could itself pass the limit.
            let (o, l) = if refs.len() == 1 {
                (parts[0].0.clone(), parts[0].1.clone())
            } else {
                spotlight_reference::merge(&group, &refs)?
            };
            out[b0 * o_per_b..batch.end * o_per_b].copy_from_slice(&o);
            lse[b0 * lse_per_b..batch.end * lse_per_b].copy_from_slice(&l);
        }
        Ok(Output {
            out: Tensor::from_f32(&out, out_dtype),
            lse: opts.lse.then_some(lse),
            probs: None,
            algorithm,
        })
    }
}
