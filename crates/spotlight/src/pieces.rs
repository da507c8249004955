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

use crate::context::Engine;
use crate::error::{Error, Result};
use crate::options::{Algorithm, Output, RunOptions};

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// Bytes of device buffers alive at once (the largest piece when split).
    pub device_bytes: u64,
    /// Pieces the problem runs in (1 = not split).
    pub pieces: usize,
    /// The cut, when split.
    pub split: Option<Split>,
    /// The kernels of a piece in one word: algorithm, tiles, key chunks (e.g.
    /// `flash/rows/bq16/bk32/tpr8/chunks1`).
    pub plan: String,
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

    /// The options each piece runs with: flash or split-k (key windows need their global key
    /// numbering), the LSE (for the merge), f32 output.
    fn piece_options(opts: &RunOptions) -> RunOptions {
        let algorithm = match opts.algorithm {
            Algorithm::SplitK => Algorithm::SplitK,
            _ => Algorithm::Flash,
        };
        RunOptions {
            lse: true,
            probs: false,
            out_dtype: Some(DType::F32),
            algorithm,
            ..*opts
        }
    }

    /// How to cut `p` so every piece fits, or why it cannot be cut. Sizes count Q, K and V in
    /// their storage dtypes; each candidate piece is then checked by the planner itself, so every
    /// buffer a piece allocates (its key chunks' partial outputs included) fits.
    pub(crate) fn split(
        &self,
        p: &Problem,
        dtypes: [DType; 3],
        opts: &RunOptions,
    ) -> Result<Split> {
        let limit = self.binding_limit();
        let refuse = |why: String, bytes: u64| Error::LimitExceeded {
            what: why,
            bytes,
            limit_name: "max_storage_buffer_binding_size",
            limit,
        };
        if opts.probs || opts.algorithm == Algorithm::ThreePass {
            return Err(refuse(
                "the three-pass score matrix, which cannot be split into pieces (flash and split-k can)".into(),
                p.probs_elems() as u64 * 4,
            ));
        }
        if let Some((what, b, size)) = p
            .bias
            .map(|b| ("bias", b, 4))
            .or(p.mask.map(|b| ("mask", b, 1)))
        {
            return Err(refuse(
                format!(
                    "a problem with a {what} past the limits (pieces do not cut biases or masks yet; \
                     without one, the problem would run in pieces)"
                ),
                p.broadcast_elems(&b) as u64 * size,
            ));
        }
        // Per batch entry: Q and O (f32 scratch at worst) and the LSE; per key of one entry: K + V.
        let q_bytes = (p.q_len * p.q_heads * p.head_dim * dtypes[0].size()) as u64;
        let o_bytes = (p.q_len * p.q_heads * p.v_head_dim * 4) as u64;
        let per_b = q_bytes.max(o_bytes).max(1);
        if per_b > limit {
            return Err(refuse(
                format!(
                    "one batch entry's queries or outputs ({} rows of {} heads), which pieces do \
                     not cut (they cut batch entries and keys)",
                    p.q_len, p.q_heads
                ),
                per_b,
            ));
        }
        let per_key = ((p.kv_heads * p.head_dim * dtypes[1].size())
            .max(p.kv_heads * p.v_head_dim * dtypes[2].size())) as u64;
        let mut batch_group = ((limit / per_b) as usize).clamp(1, p.batch);
        let keys = (limit / (batch_group as u64 * per_key.max(1))) as usize;
        if keys == 0 {
            return Err(refuse("one key of one batch entry".into(), per_key));
        }
        // Windows of whole 64-key blocks (or all keys).
        let mut key_window = (keys / 64 * 64)
            .min(p.kv_len.div_ceil(64) * 64)
            .max(64)
            .min(keys);
        let piece_opts = Self::piece_options(opts);
        loop {
            let mut piece = p.clone();
            piece.batch = batch_group;
            piece.kv_len = key_window.min(p.kv_len);
            match self.plan(&piece, dtypes, &piece_opts) {
                Ok(_) => {
                    return Ok(Split {
                        batch_group,
                        key_window,
                    });
                }
                Err(e @ (Error::LimitExceeded { .. } | Error::GridTooLarge { .. })) => {
                    // Something besides Q, K and V passes (the key chunks' partial outputs, a
                    // grid): halve the window, then the batch group, until the piece fits.
                    if key_window > 64 {
                        key_window = (key_window / 2).div_ceil(64) * 64;
                    } else if key_window > 1 && batch_group == 1 {
                        key_window /= 2;
                    } else if batch_group > 1 {
                        batch_group /= 2;
                    } else {
                        return Err(match e {
                            Error::LimitExceeded {
                                what,
                                bytes,
                                limit_name,
                                limit,
                            } => Error::LimitExceeded {
                                what: format!(
                                    "{what} (even in a piece of one batch entry and one key)"
                                ),
                                bytes,
                                limit_name,
                                limit,
                            },
                            other => other,
                        });
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Device memory `p` needs with Q, K, V stored as `dtypes` and `opts`, and whether (and how)
    /// it would be split; nothing is allocated. Errors when it cannot fit even in pieces, with the
    /// numbers.
    pub fn estimate(&self, p: &Problem, dtypes: [DType; 3], opts: &RunOptions) -> Result<Estimate> {
        p.validate()?;
        match self.plan(p, dtypes, opts) {
            Ok(plan) => Ok(Estimate {
                device_bytes: self.plan_bytes(p, plan, dtypes, opts),
                pieces: 1,
                split: None,
                plan: plan.describe(),
            }),
            Err(Error::LimitExceeded { .. } | Error::GridTooLarge { .. }) => {
                let split = self.split(p, dtypes, opts)?;
                let mut piece = p.clone();
                piece.batch = split.batch_group;
                piece.kv_len = split.key_window.min(p.kv_len);
                let piece_opts = Self::piece_options(opts);
                let plan = self.plan(&piece, dtypes, &piece_opts)?;
                Ok(Estimate {
                    device_bytes: self.plan_bytes(&piece, plan, dtypes, &piece_opts),
                    pieces: split.pieces(p),
                    split: Some(split),
                    plan: plan.describe(),
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
        let piece_opts = Self::piece_options(opts);
        let algorithm = piece_opts.algorithm;
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
                let mut plan = self.plan(&piece, inputs.dtypes(), &piece_opts)?;
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
