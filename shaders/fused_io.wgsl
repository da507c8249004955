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

fn load_q(idx: u32) -> f32 { return elem_value(q[elem_word(idx, Q_DT)], idx, Q_DT); } // load q
fn load_k(idx: u32) -> f32 { return elem_value(k[elem_word(idx, K_DT)], idx, K_DT); } // load k
fn load_v(idx: u32) -> f32 { return elem_value(v[elem_word(idx, V_DT)], idx, V_DT); } // load v
