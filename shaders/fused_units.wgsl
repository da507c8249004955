// fused_units.wgsl — shared by the scalar fused kernels (flash.wgsl, flash_rows.wgsl): how a
// workgroup's unit maps rows to query positions and heads, where a key/value row lives, and which
// keys a workgroup walks.
//
// PACK_GQA makes a unit's rows the (query position, query head) pairs of one key/value head
// (split-k decoding); PAGED reads K and V through a block table (a paged KV cache).

override PACK_GQA: bool = false;
override PAGED: bool = false;

// Query head of row `rr` of a unit (a (batch, head) pair, or with PACK_GQA a (batch, kv head)).
fn row_head(unit: u32, rr: u32) -> u32 {
    if PACK_GQA {
        return (unit % params.kv_heads) * params.group + rr % params.group;
    }
    return unit % params.q_heads;
}

// Query position of row `rr` of a unit.
fn row_pos(rr: u32) -> u32 {
    if PACK_GQA {
        return rr / params.group;
    }
    return rr;
}

// Element index of key/value row j of batch entry b (head 0, dim 0): strided, or through the
// block table in aux when PAGED (pages of page_size rows of seq_stride elements).
fn kv_row(b: u32, j: u32, batch_stride: u32, seq_stride: u32) -> u32 {
    if PAGED {
        let page = aux[params.table_off + b * params.table_stride + j / params.page_size];
        return (page * params.page_size + j % params.page_size) * seq_stride;
    }
    return b * batch_stride + j * seq_stride;
}

// The keys a workgroup whose rows sit at query positions i_first..=i_last (ordered by position)
// walks in this key chunk, [x, y), and the keys every valid row of it sees from the causal and
// window bands alone, [z, w) inside [x, y): a key tile there without mask or bias needs no
// per-element checks.
fn key_band(i_first: u32, i_last: u32, lq: u32, lk: u32, off: i32, chunk: u32) -> vec4<i32> {
    let band = visible_key_range(i_first, i_last, lq, lk, off);
    var j_lo = max(band.x, i32(params.key_base));
    var j_hi = min(band.y, i32(params.key_base + params.kv_len));
    if params.num_chunks > 1u {
        j_lo = max(j_lo, i32(params.key_base + chunk * params.chunk_keys));
        j_hi = min(j_hi, i32(params.key_base + (chunk + 1u) * params.chunk_keys));
    }
    let i_last_valid = min(i_last, max(lq, 1u) - 1u);
    let band_last = visible_key_range(i_last_valid, i_last_valid, lq, lk, off);
    let band_first = visible_key_range(i_first, i_first, lq, lk, off);
    return vec4<i32>(j_lo, j_hi, max(j_lo, band_last.x), min(j_hi, band_first.y));
}
