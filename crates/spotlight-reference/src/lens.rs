//! Attention statistics: the definitions behind `spotlight lens`, computed from the reference
//! probabilities. Every GPU statistic is checked against these.
//!
//! - entropy of a query row's distribution, `−Σ_j P_ij ln P_ij` in nats (NaN for a row with no
//!   distribution: padding rows and rows with no visible key);
//! - maximum weight of a row, `max_j P_ij` (NaN likewise);
//! - received mass of a key, `Σ_i P_ij` over the query rows of the same (batch, head);
//! - positional profile of a head: the mass a query row gives to keys at each part of its
//!   context, by absolute key position `j / Lk_b` in `bins` equal bins, averaged over the rows
//!   that have a distribution (so each head's profile sums to 1, or is all zero when no row has
//!   one). Uniform attention gives a flat profile; weight on the first tokens shows in bin 0.

use crate::problem::Problem;
use crate::reference::Reference;

/// Statistics of one problem, in f64.
#[derive(Clone, Debug)]
pub struct LensReference {
    /// `[B, Hq, Lq]`
    pub entropy: Vec<f64>,
    /// `[B, Hq, Lq]`
    pub max_weight: Vec<f64>,
    /// `[B, Hq, Lk]`
    pub received: Vec<f64>,
}

/// Statistics from the reference probabilities.
pub fn lens(p: &Problem, r: &Reference) -> LensReference {
    let rows = p.lse_elems();
    let mut entropy = vec![f64::NAN; rows];
    let mut max_weight = vec![f64::NAN; rows];
    let mut received = vec![0.0; p.batch * p.q_heads * p.kv_len];
    for row in 0..rows {
        if !r.lse[row].is_finite() {
            continue;
        }
        let probs = &r.probs[row * p.kv_len..(row + 1) * p.kv_len];
        entropy[row] = -probs
            .iter()
            .filter(|&&x| x > 0.0)
            .map(|&x| x * x.ln())
            .sum::<f64>();
        max_weight[row] = probs.iter().fold(0.0, |m, &x| m.max(x));
        let bh = row / p.q_len;
        for (j, &x) in probs.iter().enumerate() {
            received[bh * p.kv_len + j] += x;
        }
    }
    LensReference {
        entropy,
        max_weight,
        received,
    }
}

/// The positional profile of each query head (see the module docs). `received` is `[B, Hq, Lk]`,
/// `has_distribution` is `[B, Hq, Lq]` and `kv_lens` the valid key length of each batch entry.
pub fn positional_profile(
    p: &Problem,
    received: &[f64],
    has_distribution: &[bool],
    kv_lens: &[usize],
    bins: usize,
) -> Vec<Vec<f64>> {
    let bins = bins.max(1);
    let mut profile = vec![vec![0.0; bins]; p.q_heads];
    for (h, prof) in profile.iter_mut().enumerate() {
        let mut rows = 0usize;
        for (b, &lk) in kv_lens.iter().enumerate().take(p.batch) {
            let bh = b * p.q_heads + h;
            rows += has_distribution[bh * p.q_len..(bh + 1) * p.q_len]
                .iter()
                .filter(|&&x| x)
                .count();
            for j in 0..lk.min(p.kv_len) {
                prof[j * bins / lk] += received[bh * p.kv_len + j];
            }
        }
        if rows > 0 {
            prof.iter_mut().for_each(|x| *x /= rows as f64);
        }
    }
    profile
}
