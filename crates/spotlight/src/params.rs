//! The uniform block every attention pass reads (`Params` in `shaders/common.wgsl`), built from a
//! [`Problem`]. Field order must match the WGSL struct.

use spotlight_reference::Problem;

pub const F_CAUSAL: u32 = 1;
pub const F_BIAS: u32 = 2;
pub const F_MASK: u32 = 4;
pub const F_ALIBI: u32 = 8;
pub const F_QLENS: u32 = 16;
pub const F_KVLENS: u32 = 32;

/// Declares a uniform block the host writes and a shader reads, with the list of its fields'
/// names and byte offsets, which `tests/shaders.rs` checks against naga's layout of the WGSL
/// struct of the same name (size, member order, offsets): the host side of the contract is
/// written once, here, and the shader side is checked against it.
macro_rules! uniform_block {
    ($(#[$m:meta])* $svis:vis struct $name:ident { $($(#[$fm:meta])* $vis:vis $field:ident : $ty:ty,)* }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
        $svis struct $name { $($(#[$fm])* $vis $field: $ty,)* }

        impl crate::params::UniformBlock for $name {
            const NAME: &'static str = stringify!($name);
            fn fields() -> Vec<(&'static str, usize)> {
                vec![$((stringify!($field), std::mem::offset_of!($name, $field)),)*]
            }
        }
    };
}
pub(crate) use uniform_block;

/// A uniform block's host layout (see the crate-private `uniform_block!` macro).
pub trait UniformBlock: bytemuck::Pod {
    /// The name of the WGSL struct.
    const NAME: &'static str;
    /// Field names and byte offsets in declaration order.
    fn fields() -> Vec<(&'static str, usize)>;
}

/// A uniform block's host layout: WGSL struct name, size in bytes, field names and offsets.
pub type BlockLayout = (&'static str, usize, Vec<(&'static str, usize)>);

/// Every uniform block the host writes.
pub fn uniform_blocks() -> Vec<BlockLayout> {
    fn one<T: UniformBlock>() -> BlockLayout {
        (T::NAME, std::mem::size_of::<T>(), T::fields())
    }
    vec![
        one::<Params>(),
        one::<PackParams>(),
        one::<crate::lens::LensParams>(),
        one::<crate::layer::LinParams>(),
    ]
}

uniform_block! {
pub struct Params {
    batch: u32,
    q_len: u32,
    kv_len: u32,
    q_heads: u32,
    kv_heads: u32,
    head_dim: u32,
    v_head_dim: u32,
    group: u32,
    q_sb: u32,
    q_ss: u32,
    q_sh: u32,
    k_sb: u32,
    k_ss: u32,
    k_sh: u32,
    v_sb: u32,
    v_ss: u32,
    v_sh: u32,
    o_sb: u32,
    o_ss: u32,
    o_sh: u32,
    bias_sb: u32,
    bias_sh: u32,
    mask_sb: u32,
    mask_sh: u32,
    flags: u32,
    win_left: i32,
    win_right: i32,
    scale: f32,
    softcap: f32,
    /// Keys per chunk of the fused kernel's split over the key range (0 = not split).
    pub chunk_keys: u32,
    /// Number of key chunks (1 = not split).
    pub num_chunks: u32,
    /// Paged K/V: rows per page, where the block table starts in aux, and pages per sequence.
    pub page_size: u32,
    pub table_off: u32,
    pub table_stride: u32,
    /// Key windows: this dispatch holds keys `key_base .. key_base + kv_len` of `kv_total`.
    pub key_base: u32,
    pub kv_total: u32,
}
}

/// Window sides beyond this are as good as unbounded and keep `i + off ± side` inside i32.
const WINDOW_CLAMP: u32 = 1 << 30;

fn window_side(side: Option<u32>) -> i32 {
    side.map_or(-1, |s| s.min(WINDOW_CLAMP) as i32)
}

impl Params {
    /// Sizes must already be validated (they fit in u32 by [`Problem::validate`]).
    pub fn new(p: &Problem) -> Self {
        let (q, k, v, o) = (p.q_strides(), p.k_strides(), p.v_strides(), p.o_strides());
        let (bias_sb, bias_sh) = p.bias.map_or((0, 0), |b| b.strides(p.q_len, p.kv_len));
        let (mask_sb, mask_sh) = p.mask.map_or((0, 0), |b| b.strides(p.q_len, p.kv_len));
        let mut flags = 0;
        for (on, f) in [
            (p.causal, F_CAUSAL),
            (p.bias.is_some(), F_BIAS),
            (p.mask.is_some(), F_MASK),
            (p.alibi, F_ALIBI),
            (p.q_seqlens, F_QLENS),
            (p.kv_seqlens, F_KVLENS),
        ] {
            if on {
                flags |= f;
            }
        }
        let window = p.window.unwrap_or_default();
        let u = |x: usize| x as u32;
        Params {
            batch: u(p.batch),
            q_len: u(p.q_len),
            kv_len: u(p.kv_len),
            q_heads: u(p.q_heads),
            kv_heads: u(p.kv_heads),
            head_dim: u(p.head_dim),
            v_head_dim: u(p.v_head_dim),
            group: u(p.group_size()),
            q_sb: u(q.batch),
            q_ss: u(q.seq),
            q_sh: u(q.head),
            k_sb: u(k.batch),
            k_ss: u(k.seq),
            k_sh: u(k.head),
            v_sb: u(v.batch),
            v_ss: u(v.seq),
            v_sh: u(v.head),
            o_sb: u(o.batch),
            o_ss: u(o.seq),
            o_sh: u(o.head),
            bias_sb: u(bias_sb),
            bias_sh: u(bias_sh),
            mask_sb: u(mask_sb),
            mask_sh: u(mask_sh),
            flags,
            win_left: window_side(window.left),
            win_right: window_side(window.right),
            scale: p.effective_scale(),
            softcap: p.effective_softcap(),
            chunk_keys: 0,
            num_chunks: 1,
            page_size: 0,
            table_off: 0,
            table_stride: 0,
            key_base: 0,
            kv_total: u(p.kv_len),
        }
    }
}

uniform_block! {
/// Uniform block of `shaders/pack.wgsl`.
pub struct PackParams {
    pub count: u32,
    pub words: u32,
    pub pad0: u32,
    pub pad1: u32,
}
}
