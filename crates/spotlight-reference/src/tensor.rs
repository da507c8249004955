//! Element types and borrowed/owned tensors of f32, f16 or bf16 values.

use half::{bf16, f16};

/// Storage type of a tensor. Arithmetic is always at least f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DType {
    #[default]
    F32,
    F16,
    Bf16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }

    /// Rounds an f32 value to this dtype and back (what storing it would keep).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            _ => Err(format!("unknown dtype '{s}': expected f32, f16 or bf16")),
        }
    }
}

/// A borrowed tensor in one of the storage dtypes.
#[derive(Clone, Copy, Debug)]
pub enum TensorRef<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl TensorRef<'_> {
    pub fn dtype(&self) -> DType {
        match self {
            TensorRef::F32(_) => DType::F32,
            TensorRef::F16(_) => DType::F16,
            TensorRef::Bf16(_) => DType::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            TensorRef::F32(x) => x.len(),
            TensorRef::F16(x) => x.len(),
            TensorRef::Bf16(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range` of this tensor (e.g. some rows of a row-major tensor), without copying.
    /// Panics when the range is out of bounds, like slice indexing.
    pub fn slice(&self, range: std::ops::Range<usize>) -> TensorRef<'_> {
        match self {
            TensorRef::F32(x) => TensorRef::F32(&x[range]),
            TensorRef::F16(x) => TensorRef::F16(&x[range]),
            TensorRef::Bf16(x) => TensorRef::Bf16(&x[range]),
        }
    }

    /// Element `i` as f32 (exact for every dtype).
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            TensorRef::F32(x) => x[i],
            TensorRef::F16(x) => x[i].to_f32(),
            TensorRef::Bf16(x) => x[i].to_f32(),
        }
    }

    /// The raw little-endian bytes, as they are stored on the GPU.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            TensorRef::F32(x) => bytemuck_cast(x),
            TensorRef::F16(x) => bytemuck_cast(x),
            TensorRef::Bf16(x) => bytemuck_cast(x),
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }
}

fn bytemuck_cast<T: Copy>(x: &[T]) -> &[u8] {
    // SAFETY: f32, f16 and bf16 are plain old data without padding; the byte view covers
    // exactly the slice's memory and lives as long as it.
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
}

/// An owned tensor in one of the storage dtypes.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32(Vec<f32>),
    F16(Vec<f16>),
    Bf16(Vec<bf16>),
}

impl Tensor {
    /// Converts f32 values to `dtype` (rounding to nearest even).
    pub fn from_f32(values: &[f32], dtype: DType) -> Self {
        match dtype {
            DType::F32 => Tensor::F32(values.to_vec()),
            DType::F16 => Tensor::F16(values.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::Bf16 => Tensor::Bf16(values.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    pub fn as_ref(&self) -> TensorRef<'_> {
        match self {
            Tensor::F32(x) => TensorRef::F32(x),
            Tensor::F16(x) => TensorRef::F16(x),
            Tensor::Bf16(x) => TensorRef::Bf16(x),
        }
    }

    pub fn dtype(&self) -> DType {
        self.as_ref().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_ref().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.as_ref().to_f32_vec()
    }
}
