// fused_units.wgsl — shared by the scalar fused kernels (flash.wgsl, flash_rows.wgsl): how a
// workgroup's unit maps rows to query positions and heads, and where a key/value row lives.
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
