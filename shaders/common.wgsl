// common.wgsl — shared by every attention pass: the problem parameters, the auxiliary buffer
// (sequence lengths and ALiBi slopes), dtype unpacking and dispatch folding.
//
// Storage dtypes: f32 = 0, f16 = 1, bf16 = 2. Half-precision tensors are read as packed u32 words
// (two elements per word) and unpacked here, so every adapter gets every dtype whether or not it
// offers SHADER_F16.

struct Params {
    batch: u32, q_len: u32, kv_len: u32, q_heads: u32,
    kv_heads: u32, head_dim: u32, v_head_dim: u32, group: u32,
    q_sb: u32, q_ss: u32, q_sh: u32, k_sb: u32,
    k_ss: u32, k_sh: u32, v_sb: u32, v_ss: u32,
    v_sh: u32, o_sb: u32, o_ss: u32, o_sh: u32,
    bias_sb: u32, bias_sh: u32, mask_sb: u32, mask_sh: u32,
    flags: u32, win_left: i32, win_right: i32, scale: f32,
    softcap: f32, chunk_keys: u32, num_chunks: u32, page_size: u32,
    table_off: u32, table_stride: u32, key_base: u32, kv_total: u32,
}

const F_CAUSAL: u32 = 1u;
const F_BIAS: u32 = 2u;
const F_MASK: u32 = 4u;
const F_ALIBI: u32 = 8u;
const F_QLENS: u32 = 16u;
const F_KVLENS: u32 = 32u;

@group(0) @binding(0) var<uniform> params: Params;
// [q_seqlens: B][kv_seqlens: B][alibi slopes (f32 bits): Hq][block table: B x table_stride]
@group(0) @binding(1) var<storage, read> aux: array<u32>;

fn has(flag: u32) -> bool {
    return (params.flags & flag) != 0u;
}

fn neg_inf() -> f32 {
    return bitcast<f32>(0xff800000u);
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// By its bits: `x != x` is an ordered comparison in SPIR-V (naga emits FOrdNotEqual), false for
// NaN. Likewise, NaN-aware code below writes `!(x == y)` where `x != y` would be false for NaN.
fn is_nan(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u;
}

// A caller's sequence length (i32 bits) clamped to [0, limit]: a negative length means 0, as
// documented for `attention_on_buffers` (the host checks the values it uploads itself).
fn clamp_len(bits: u32, limit: u32) -> u32 {
    return min(u32(max(bitcast<i32>(bits), 0)), limit);
}

// Valid query length of batch entry b.
fn q_valid(b: u32) -> u32 {
    if has(F_QLENS) {
        return clamp_len(aux[b], params.q_len);
    }
    return params.q_len;
}

// Valid key length of batch entry b. Keys are numbered globally: a problem split into key
// windows sees keys key_base .. key_base + kv_len of kv_total (unsplit: key_base 0, kv_total kv_len).
fn kv_valid(b: u32) -> u32 {
    if has(F_KVLENS) {
        return clamp_len(aux[params.batch + b], params.kv_total);
    }
    return params.kv_total;
}

fn alibi_slope(h: u32) -> f32 {
    return bitcast<f32>(aux[2u * params.batch + h]);
}

// Word holding element idx of a tensor of dtype dt.
fn elem_word(idx: u32, dt: u32) -> u32 {
    return select(idx >> 1u, idx, dt == 0u);
}

// Element idx of dtype dt, given the word that holds it.
fn elem_value(word: u32, idx: u32, dt: u32) -> f32 {
    if dt == 0u {
        return bitcast<f32>(word);
    }
    let bits = (word >> ((idx & 1u) * 16u)) & 0xffffu;
    if dt == 1u {
        return unpack2x16float(bits).x;
    }
    return bitcast<f32>(bits << 16u);
}

// The linear workgroup index of a dispatch folded into 2-D (x up to 65535, then y).
fn folded_group(wg: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wg.x + wg.y * nwg.x;
}
