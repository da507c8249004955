// fused_io.wgsl — shared by the fused kernels (flash.wgsl, flash_rows.wgsl, flash_decode.wgsl,
// flash_coop.wgsl): their tensor bindings (Q, K, V packed in u32 words, the f32 output and LSE)
// and element loads.
//
// A variant that reads f16 natively (SHADER_F16) gets the bindings marked `// tensor t` and the
// load lines marked `// load t` rewritten by kernels/ (`Variant::source`); one with wide K/V
// loads gets the K and V bindings rewritten as vec4/vec2 words (kv_loads.wgsl).

@group(0) @binding(4) var<storage, read> q: array<u32>; // tensor q
@group(0) @binding(5) var<storage, read> k: array<u32>; // tensor k
@group(0) @binding(6) var<storage, read> v: array<u32>; // tensor v
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> lse: array<f32>;

// O's dtype where the fused kernels (flash.wgsl, flash_rows.wgsl, flash_decode.wgsl,
// flash_coop.wgsl) write it themselves: 0 = f32 (also every split-K partial output); 1 = f16,
// 2 = bf16 in the half variant
// (runs without key chunks, Dv even), whose rewrite (kernels/) binds `out` as u32 words and puts
// half_out.wgsl's store_o in place of the one below: no f32 copy of O and no pack pass after
// the kernel.
override OUT_DT: u32 = 0u;

// Row elements e..e+3 of O (e = its start + 4·col, vec4 column col; one thread writes a column):
// those inside V_DIM.
fn store_o(e: u32, col: u32, o: vec4<f32>) {
    for (var c = 0u; c < 4u; c++) { // unroll
        if 4u * col + c < V_DIM {
            out[e + c] = o[c];
        }
    }
}

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
