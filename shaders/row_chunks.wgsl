// row_chunks.wgsl — the dot products of the forward row kernel (flash_rows.wgsl), one chunk of
// WG vec4 columns at a time. (Written to serve the backward's row kernels too; they now own
// their columns differently and take their dot products from row_scatter.wgsl, with `dot`.)
//
// s[r·KBL + c] += x[row r]·y[vector c] over chunk n of the columns (cols4 vec4 columns in all):
// every lane holds vec4 column n·WG + lane of each of the R register rows x (Q rows) and passes
// column n·WG + u to every lane by subgroupShuffle; each lane loads its KBL vectors of the other
// operand, `row_vec4(which, yb[c], column)`, once per column and feeds each R·4 FMAs. Only columns
// inside the head dim: past it x is 0 but the loaded row may hold inf (the next row), and 0·inf is
// NaN. The including kernel defines R, KBL, WG and `row_vec4`, whose `which` (a constant at every
// call, so the compiler keeps one branch) names the tensor: 0, the logits' operand, is the only one
// in use.
// Each product is accumulated by `fma`, a chain of four per vec4 instead of `s += dot(x, y)`:
// Mesa 26's llvmpipe compiles `fma` to one vfmadd and keeps a written multiply and add apart
// (the forward's JIT code with `fma` here and in P·V, sampled with gdb on 2026-12-07: 574 vfmadd
// and 48 vmulps against 66 and 704 without), 1,1024,2,64 forward 8.1 -> 7.4 ms for this part;
// Mesa 22 within noise in run time and compile.
fn dot_chunk(n: u32, cols4: u32, xd: array<vec4<f32>, R>, yb: array<u32, KBL>, which: u32, s: ptr<function, array<f32, R * KBL>>) {
    let n_u = min(WG, cols4 - n * WG);
    for (var u = 0u; u < n_u; u++) {
        var yv: array<vec4<f32>, KBL>;
        for (var c = 0u; c < KBL; c++) { // unroll
            yv[c] = row_vec4(which, yb[c], 4u * (n * WG + u));
        }
        for (var r = 0u; r < R; r++) { // unroll
            let xv = subgroupShuffle(xd[r], u);
            for (var c = 0u; c < KBL; c++) { // unroll
                let y = yv[c];
                (*s)[r * KBL + c] = fma(xv.w, y.w, fma(xv.z, y.z, fma(xv.y, y.y, fma(xv.x, y.x, (*s)[r * KBL + c]))));
            }
        }
    }
}
