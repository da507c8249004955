// flash_coop.wgsl — fused attention on matrix units (tensor cores) through cooperative matrices:
// Q·Kᵀ and P·V as 16x16x16 f16 products with f32 accumulation, the online softmax in scalar code
// through workgroup memory (cooperative matrices have no per-element access).
//
// One workgroup is one subgroup (WG = the adapter's subgroup size) and owns 16 query rows of one
// (batch, head). Per 16-key tile: K and V are staged as f16, S = Q·Kᵀ goes through the matrix
// units into workgroup memory, 16 threads apply the semantics (logits.wgsl) and the online softmax
// to their rows and rescale their rows of the f32 output accumulator, and O += P·V goes through
// the matrix units again. Key tiles outside the causal/window band are skipped as in flash.wgsl.
// Known naga 30 bug: a cooperative load or store whose index is an inline expression panics the
// SPIR-V writer, so every index is bound to a `let` first.

override Q_DT: u32 = 1u;
override K_DT: u32 = 1u;
override V_DT: u32 = 1u;
override HEAD_DIM: u32 = 64u; // a multiple of 16
override V_DIM: u32 = 64u; // a multiple of 16
override WG: u32 = 32u; // the subgroup size: one subgroup per workgroup

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;

// Element loads; a variant that reads f16 natively (SHADER_F16) gets these lines rewritten.
fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v

const T: u32 = 16u;

var<workgroup> q_h: array<f16, T * HEAD_DIM>;
var<workgroup> k_h: array<f16, T * HEAD_DIM>;
var<workgroup> v_h: array<f16, T * V_DIM>;
var<workgroup> s_f: array<f32, 256>;
var<workgroup> p_h: array<f16, 256>;
var<workgroup> o_f: array<f32, T * V_DIM>;
var<workgroup> zero_f: array<f32, 256>;

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let tiles_i = (params.q_len + T - 1u) / T;
    // No early return: cooperative-matrix operations need uniform control flow all the way, so
    // a workgroup past the grid runs an empty key range and writes nothing.
    let groups = tiles_i * params.batch * params.q_heads;
    let live = folded_group(wg, nwg) < groups;
    let flat = min(folded_group(wg, nwg), groups - 1u);
    let ti = flat % tiles_i;
    let bh = flat / tiles_i;
    let h = bh % params.q_heads;
    let b = bh / params.q_heads;
    let kvh = h / params.group;
    let i0 = ti * T;
    let lq = q_valid(b);
    let lk = kv_valid(b);
    let off = i32(lk) - i32(lq);
    let ninf = neg_inf();

    for (var x = lid; x < T * HEAD_DIM; x += WG) {
        let ii = i0 + x / HEAD_DIM;
        var val = 0.0;
        if ii < lq {
            let idx = b * params.q_sb + ii * params.q_ss + h * params.q_sh + x % HEAD_DIM;
            val = load_q(idx);
        }
        q_h[x] = f16(val);
    }
    for (var x = lid; x < T * V_DIM; x += WG) {
        o_f[x] = 0.0;
    }
    for (var x = lid; x < 256u; x += WG) {
        zero_f[x] = 0.0;
    }

    let band = visible_key_range(i0, i0 + T - 1u, lq, lk, off);
    let j_lo = band.x;
    var j_hi = band.y;
    if !live {
        j_hi = 0;
    }

    // Row statistics live in the thread that owns the row (lid < 16).
    let r = lid;
    let i = i0 + r;
    var m = ninf;
    var l = 0.0;
    let z = 0u;
    var j0 = (j_lo / i32(T)) * i32(T);
    for (; j0 < j_hi; j0 += i32(T)) {
        let ju = u32(j0);
        workgroupBarrier();
        for (var x = lid; x < T * HEAD_DIM; x += WG) {
            let jj = ju + x / HEAD_DIM;
            var val = 0.0;
            if jj < lk {
                val = load_k(b * params.k_sb + jj * params.k_ss + kvh * params.k_sh + x % HEAD_DIM);
            }
            k_h[x] = f16(val);
        }
        for (var x = lid; x < T * V_DIM; x += WG) {
            let jj = ju + x / V_DIM;
            var val = 0.0;
            if jj < lk {
                val = load_v(b * params.v_sb + jj * params.v_ss + kvh * params.v_sh + x % V_DIM);
            }
            v_h[x] = f16(val);
        }
        workgroupBarrier();

        // S = Q·Kᵀ: A = Q[:, d0..d0+16] row-major, B = K[:, d0..d0+16]ᵀ (K row-major is Kᵀ
        // column-major), C accumulates in f32.
        var acc = coopLoadT<coop_mat16x16<f32, C>>(&zero_f[z], 16u);
        for (var d0 = 0u; d0 < HEAD_DIM; d0 += 16u) {
            let at = d0;
            let qa = coopLoadT<coop_mat16x16<f16, A>>(&q_h[at], HEAD_DIM);
            let kb = coopLoad<coop_mat16x16<f16, B>>(&k_h[at], HEAD_DIM);
            acc = coopMultiplyAdd(qa, kb, acc);
        }
        coopStoreT(acc, &s_f[z], 16u);
        workgroupBarrier();

        if lid < T {
            var m_tile = ninf;
            for (var jj = 0u; jj < T; jj++) {
                let j = ju + jj;
                var s = ninf;
                let mine = i32(j) >= j_lo && i32(j) < j_hi;
                if mine && i < lq && visible(b, h, i, j, off, lk) {
                    s = finish_logit(b, h, i, j, off, s_f[r * T + jj]);
                }
                s_f[r * T + jj] = s;
                m_tile = max(m_tile, s);
            }
            let m_new = max(m, m_tile);
            var alpha = 0.0;
            if !(m == ninf) {
                alpha = exp(m - m_new);
            }
            var row_sum = 0.0;
            for (var jj = 0u; jj < T; jj++) {
                let s = s_f[r * T + jj];
                var p = 0.0;
                if is_nan(s) {
                    p = s;
                } else if !(m_new == ninf) && !(s == ninf) {
                    p = exp(s - m_new);
                }
                let ph = f16(p);
                p_h[r * T + jj] = ph;
                row_sum += f32(ph); // the sum of what P·V multiplies, so O stays normalised
            }
            l = l * alpha + row_sum;
            for (var c = 0u; c < V_DIM; c++) {
                o_f[r * V_DIM + c] *= alpha;
            }
            m = m_new;
        }
        workgroupBarrier();

        // O += P·V, 16 output columns at a time.
        for (var dv0 = 0u; dv0 < V_DIM; dv0 += 16u) {
            let at = dv0;
            var oc = coopLoadT<coop_mat16x16<f32, C>>(&o_f[at], V_DIM);
            let pa = coopLoadT<coop_mat16x16<f16, A>>(&p_h[z], 16u);
            let vb = coopLoadT<coop_mat16x16<f16, B>>(&v_h[at], V_DIM);
            oc = coopMultiplyAdd(pa, vb, oc);
            coopStoreT(oc, &o_f[at], V_DIM);
        }
    }
    workgroupBarrier();

    if live && lid < T && i < params.q_len {
        let valid = i < lq && !(l == 0.0);
        for (var d = 0u; d < V_DIM; d++) {
            var o = 0.0;
            if valid {
                o = o_f[r * V_DIM + d] / l;
            }
            out[b * params.o_sb + i * params.o_ss + h * params.o_sh + d] = o;
        }
        lse[(b * params.q_heads + h) * params.q_len + i] = select(ninf, m + log(l), valid);
    }
}
