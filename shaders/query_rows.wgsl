// query_rows.wgsl — shared by the backward's query-row kernels (backward_q_rows.wgsl and
// backward_dq_rows.wgsl, after their R, NK8, k binding and dqs output): which R query rows a
// workgroup owns, K read four elements at a time, and dQ written out.

// The workgroup's batch entry, query head and first row; `ok` is false past the grid's end.
struct QueryRows {
    ok: bool,
    b: u32,
    h: u32,
    i0: u32,
}

fn query_rows(wg: vec3<u32>, nwg: vec3<u32>) -> QueryRows {
    let tiles_i = (params.q_len + R - 1u) / R;
    let flat = folded_group(wg, nwg);
    let unit = flat / tiles_i;
    let ok = flat < tiles_i * params.batch * params.q_heads;
    return QueryRows(ok, unit / params.q_heads, unit % params.q_heads, (flat % tiles_i) * R);
}

fn k4(base: u32, d0: u32) -> vec4<f32> { return k4_scalar(base, d0); } // load k4

fn k4_scalar(base: u32, d0: u32) -> vec4<f32> {
    var x = vec4<f32>(0.0);
    for (var c = 0u; c < 4u; c++) {
        if d0 + c < HEAD_DIM {
            x[c] = load_k(base + d0 + c);
        }
    }
    return x;
}

// dQ of the R rows from this lane's accumulators (vec4 columns lid + WG·n), in Q's layout; added
// to what an earlier dispatch wrote when the range accumulates. Row r is always in slot 0 and
// the slots move down by one after each row (register moves), so the stores are written once,
// not R times (see flash_rows.wgsl's last loop: each store is a lane loop in gallivm).
fn store_dq(acc_rows: array<vec4<f32>, R * NK8>, b: u32, h: u32, i0: u32, lid: u32) {
    var acc = acc_rows;
    for (var r = 0u; r < R; r++) {
        let i = i0 + r;
        if i < params.q_len {
            let qb = b * params.q_sb + i * params.q_ss + h * params.q_sh;
            for (var n = 0u; n < NK8; n++) { // unroll
                let col = n * WG + lid;
                let a = acc[n];
                for (var c = 0u; c < 4u; c++) { // unroll
                    if 4u * col + c < HEAD_DIM {
                        var val = a[c];
                        if range.accumulate != 0u {
                            val = dqs[qb + 4u * col + c] + val;
                        }
                        dqs[qb + 4u * col + c] = val;
                    }
                }
            }
        }
        for (var k = 0u; k < R - 1u; k++) { // unroll
            for (var n = 0u; n < NK8; n++) { // unroll
                acc[k * NK8 + n] = acc[(k + 1u) * NK8 + n];
            }
        }
    }
}
