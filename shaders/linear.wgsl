// linear.wgsl — the projections of the attention layer: Y = X·Wᵀ + b (W `[N, K]` as in
// torch.nn.Linear), f32 accumulation, with the rotary embedding applied in the epilogue and the
// columns scattered into up to three outputs (Q, K and V of a fused QKV weight). Standalone: it
// shares no bindings with the attention kernels.
//
// Storage dtypes (X_DT, W_DT): f32 = 0, f16 = 1, bf16 = 2; half-precision tensors are read as
// packed u32 words (two elements per word) and widened exactly, on every adapter.
//
// Tiles (reasons): a workgroup of 16x16 threads owns a 64x64 output tile, each thread 4 rows x 4
// columns (16 accumulators in registers: 8 tile loads per 16 FMAs per k step). K advances in
// steps of 16: X and W tiles of 64x16 each, 2 x 4.1 KiB of workgroup memory (fits the 16 KiB
// WebGPU guarantees, leaves room for two workgroups per 32 KiB core on lavapipe and GPUs).
// - Thread (tx, ty) owns rows ty + 16i and the column PAIRS 2tx + 32j + {0, 1}: a pair is two
//   adjacent columns, which is what the rotary epilogue rotates (see the layer: rotate-half
//   weights are permuted at upload so every rotated pair is adjacent).
// - Tiles are stored k-major with a row stride of 66 words (64 + 2). Loading, 16 consecutive
//   threads read 16 consecutive k of one row (coalesced) and store them 66 words apart; with the
//   next 16 threads on the next row, a 32-wide group writes banks 2k + row (mod 32): all
//   distinct. Reading, the 16 threads of a row-group read W words 2tx (+1) of one k: distinct
//   banks, and X words ty + 16i: one word per row (broadcast). No bank conflicts either way.

struct LinParams {
    m: u32,        // rows of X and Y
    n: u32,        // columns of Y (rows of W)
    k: u32,        // columns of X and W
    n_q: u32,      // columns [0, n_q) go to out0, [n_q, n_q + n_k) to out1, the rest to out2
    n_k: u32,
    head_dim: u32, // rotary: columns are heads of head_dim in out0 and out1
    rot_half: u32, // rotary pairs per head (0 = no rotation)
    flags: u32,
}

const F_BIAS: u32 = 1u;

override X_DT: u32 = 0u;
override W_DT: u32 = 0u;

@group(0) @binding(0) var<uniform> lp: LinParams;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
// (cos, sin) of every row's position and pair: [m][rot_half][2], computed on the host in f64.
@group(0) @binding(4) var<storage, read> rope: array<f32>;
@group(0) @binding(5) var<storage, read_write> out0: array<f32>;
@group(0) @binding(6) var<storage, read_write> out1: array<f32>;
@group(0) @binding(7) var<storage, read_write> out2: array<f32>;

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const STRIDE: u32 = 66u; // BM + 2 = BN + 2: see the bank note above

var<workgroup> xs: array<f32, 1056>; // BK * STRIDE
var<workgroup> ws: array<f32, 1056>;

fn unpack(word: u32, idx: u32, dt: u32) -> f32 {
    if dt == 0u {
        return bitcast<f32>(word);
    }
    let bits = (word >> ((idx & 1u) * 16u)) & 0xffffu;
    if dt == 1u {
        return unpack2x16float(bits).x;
    }
    return bitcast<f32>(bits << 16u);
}

fn load_x(idx: u32) -> f32 {
    return unpack(x[select(idx >> 1u, idx, X_DT == 0u)], idx, X_DT);
}

fn load_w(idx: u32) -> f32 {
    return unpack(w[select(idx >> 1u, idx, W_DT == 0u)], idx, W_DT);
}

fn store(m: u32, c: u32, y: f32) {
    if c < lp.n_q {
        out0[m * lp.n_q + c] = y;
    } else if c < lp.n_q + lp.n_k {
        out1[m * lp.n_k + (c - lp.n_q)] = y;
    } else {
        let n_v = lp.n - lp.n_q - lp.n_k;
        out2[m * n_v + (c - lp.n_q - lp.n_k)] = y;
    }
}

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let tiles_n = (lp.n + BN - 1u) / BN;
    let tiles_m = (lp.m + BM - 1u) / BM;
    let g = wg.x + wg.y * nwg.x;
    if g >= tiles_m * tiles_n {
        return;
    }
    let m0 = (g / tiles_n) * BM;
    let n0 = (g % tiles_n) * BN;
    let tx = lid.x;
    let ty = lid.y;
    // acc[4 * i + 2 * j + e]: row ty + 16i, column 2tx + 32j + e.
    var acc: array<f32, 16>;
    for (var c = 0u; c < 16u; c++) {
        acc[c] = 0.0;
    }
    let lk = li % BK;
    let lrow = li / BK;
    for (var k0 = 0u; k0 < lp.k; k0 += BK) {
        let gk = k0 + lk;
        for (var r = 0u; r < 4u; r++) {
            let row = lrow + 16u * r;
            var xv = 0.0;
            if m0 + row < lp.m && gk < lp.k {
                xv = load_x((m0 + row) * lp.k + gk);
            }
            xs[lk * STRIDE + row] = xv;
            var wv = 0.0;
            if n0 + row < lp.n && gk < lp.k {
                wv = load_w((n0 + row) * lp.k + gk);
            }
            ws[lk * STRIDE + row] = wv;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            let base = kk * STRIDE;
            var a: array<f32, 4>;
            var b: array<f32, 4>;
            for (var i = 0u; i < 4u; i++) {
                a[i] = xs[base + ty + 16u * i];
            }
            for (var j = 0u; j < 2u; j++) {
                b[2u * j] = ws[base + 2u * tx + 32u * j];
                b[2u * j + 1u] = ws[base + 2u * tx + 32u * j + 1u];
            }
            for (var i = 0u; i < 4u; i++) {
                for (var c = 0u; c < 4u; c++) {
                    acc[4u * i + c] = fma(a[i], b[c], acc[4u * i + c]);
                }
            }
        }
        workgroupBarrier();
    }
    let rot_cols = lp.n_q + lp.n_k;
    for (var i = 0u; i < 4u; i++) {
        let m = m0 + ty + 16u * i;
        if m >= lp.m {
            continue;
        }
        for (var j = 0u; j < 2u; j++) {
            let c = n0 + 2u * tx + 32u * j;
            if c >= lp.n {
                continue;
            }
            var y0 = acc[4u * i + 2u * j];
            var y1 = acc[4u * i + 2u * j + 1u];
            let pair = c + 1u < lp.n;
            if (lp.flags & F_BIAS) != 0u {
                y0 += bias[c];
                if pair {
                    y1 += bias[c + 1u];
                }
            }
            // Rotary: the pair (c, c + 1) of a Q or K head (c is even, and so are n_q and the
            // head dim whenever rot_half > 0, so a pair never straddles two heads).
            if lp.rot_half > 0u && c < rot_cols {
                let d = select(c - lp.n_q, c, c < lp.n_q) % lp.head_dim;
                let p = d / 2u;
                if p < lp.rot_half {
                    let t = (m * lp.rot_half + p) * 2u;
                    let cs = rope[t];
                    let sn = rope[t + 1u];
                    let a0 = y0;
                    y0 = a0 * cs - y1 * sn;
                    y1 = a0 * sn + y1 * cs;
                }
            }
            store(m, c, y0);
            if pair {
                store(m, c + 1u, y1);
            }
        }
    }
}
