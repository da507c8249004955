// lens.wgsl — attention statistics from the final LSE, without storing the attention map.
//
// One workgroup owns 16 query rows of one (batch, head) and walks the keys [key_begin, key_end)
// in tiles of 16, recomputing each logit exactly as the attention passes do (logits.wgsl) and
// turning it into its probability p = exp(s - LSE). It accumulates, per query row, the entropy
// terms p · (LSE - s) and the largest logit (the row's maximum weight is exp(max s - LSE)); per
// key, the probability mass this tile of rows gives it (column sums, reduced on the host over
// row tiles); and, for a selected range of heads and rows of batch entry 0, the map itself.
// Successive dispatches over key ranges accumulate into the same row statistics.
//
// stats layout (f32): [row entropy: R][row max logit: R][column partials: B*Hq*tiles_i*Lk][map],
// R = B*Hq*Lq.

struct LensParams {
    key_begin: u32,
    key_end: u32,
    first: u32,
    col_off: u32,
    map_off: u32,
    map_head0: u32,
    map_heads: u32,
    map_row0: u32,
    map_rows: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

override Q_DT: u32 = 0u;
override K_DT: u32 = 0u;

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
@group(0) @binding(6) var<storage, read> lse: array<f32>;
@group(0) @binding(7) var<storage, read_write> stats: array<f32>;
@group(0) @binding(8) var<uniform> lp: LensParams;

var<workgroup> red: array<array<f32, 17>, 16>;
var<workgroup> red2: array<array<f32, 17>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    let tiles_i = (params.q_len + TS - 1u) / TS;
    let flat = folded_group(wg, nwg);
    if flat >= tiles_i * params.batch * params.q_heads {
        return;
    }
    let ti = flat % tiles_i;
    let bh = flat / tiles_i;
    let h = bh % params.q_heads;
    let b = bh / params.q_heads;
    let kvh = h / params.group;
    let i = ti * TS + lid.y;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();
    let rows = params.batch * params.q_heads * params.q_len;
    let row = bh * params.q_len + i;
    var row_lse = ninf;
    if i < params.q_len {
        row_lse = lse[row];
    }
    let live = i < lq && !(row_lse == ninf);

    var ent = 0.0;
    var smax = ninf;
    for (var j0 = lp.key_begin; j0 < lp.key_end; j0 += TS) {
        let j = j0 + lid.x;
        let kr = j0 + lid.y;
        let acc = qk_tile_dot(b, h, kvh, i, kr, lid);
        var p = 0.0;
        if live && j < lp.key_end && visible(b, h, i, j, off, lk) {
            let s = finish_logit(b, h, i, j, off, acc);
            // A -inf logit takes no part (and must not reach the entropy as 0 · inf).
            if !(s == ninf) {
                p = sm_weight(s, row_lse);
                ent += p * (row_lse - s);
                smax = max(smax, s);
            }
        }
        // Column sums over this tile's rows.
        red[lid.y][lid.x] = p;
        workgroupBarrier();
        if lid.y == 0u && j < lp.key_end {
            var col = 0.0;
            for (var r = 0u; r < TS; r++) {
                col += red[r][lid.x];
            }
            // Key ranges of successive dispatches are disjoint: each column is written once.
            stats[lp.col_off + (bh * tiles_i + ti) * params.kv_len + j] = col;
        }
        workgroupBarrier();
        if b == 0u && h >= lp.map_head0 && h < lp.map_head0 + lp.map_heads && i >= lp.map_row0
            && i < lp.map_row0 + lp.map_rows && j < lp.key_end {
            let m = ((h - lp.map_head0) * lp.map_rows + (i - lp.map_row0)) * params.kv_len + j;
            stats[lp.map_off + m] = p;
        }
    }

    // Row reductions over the 16 threads of each row.
    red[lid.y][lid.x] = ent;
    red2[lid.y][lid.x] = smax;
    workgroupBarrier();
    if lid.x == 0u && i < params.q_len {
        var e = 0.0;
        var mx = ninf;
        for (var c = 0u; c < TS; c++) {
            e += red[lid.y][c];
            mx = max(mx, red2[lid.y][c]);
        }
        if lp.first == 1u {
            stats[row] = e;
            stats[rows + row] = mx;
        } else {
            stats[row] += e;
            stats[rows + row] = max(stats[rows + row], mx);
        }
    }
}
