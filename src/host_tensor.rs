//! Tensors' values on the host, for the CPU (burn flex) routes that run hand-written loops instead
//! of element-wise tensor passes: a flex tensor's buffer borrowed or moved without a copy, and the
//! instruction set those loops are compiled for. A leaf: the model and the crosscoder both use it.

use anyhow::Result;
use burn::tensor::{DType, Device, Tensor, TensorData};

/// A tensor's values on the host: on flex the tensor's own buffer, borrowed in place (the CPU
/// routes read the parameters this way instead of copying a 1.4 GB decoder out every step); on
/// other devices, or for a strided flex tensor, a read-back copy.
pub enum HostValues {
    /// A contiguous f32 flex tensor (holding its buffer) and the elements of the buffer it covers.
    Borrowed(burn_flex::FlexTensor, std::ops::Range<usize>),
    Owned(Vec<f32>),
}

impl HostValues {
    pub fn of<const N: usize>(t: &Tensor<N>) -> Result<Self> {
        use burn_dispatch::{BackendTensor, DispatchTensorKind};
        if let DispatchTensorKind::Flex(BackendTensor::Float(ft)) = t.clone().into_dispatch().kind
            && ft.dtype() == DType::F32
            && let Some((start, end)) = ft.layout().contiguous_offsets()
        {
            return Ok(Self::Borrowed(ft, start..end));
        }
        Ok(Self::Owned(crate::counters::read_f32(t.clone())?))
    }
}

impl std::ops::Deref for HostValues {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Self::Borrowed(t, range) => &t.storage::<f32>()[range.clone()],
            Self::Owned(v) => v,
        }
    }
}

/// A flex tensor's values moved out as a `Vec` (no copy when nothing else holds the buffer; not a
/// device readback): for host passes that update a tensor in place and wrap it again with [`give_vec`].
pub fn take_vec<const N: usize>(t: Tensor<N>) -> Result<Vec<f32>> {
    t.into_data().try_into_vec::<f32>().map_err(|e| anyhow::anyhow!("a tensor's values on the host: {e:?}"))
}

/// The inverse of [`take_vec`]: the values wrapped as a flex tensor again (no copy, not counted as
/// a transfer).
pub fn give_vec<const N: usize>(values: Vec<f32>, shape: [usize; N], device: &Device) -> Tensor<N> {
    Tensor::from_data(TensorData::new(values, shape), (device, DType::F32))
}

/// The instruction set a host loop runs with, chosen once per call: the loops are written plainly
/// (so the compiler vectorises them) and compiled for AVX-512 and AVX2 as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

impl Simd {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Self::Avx2;
            }
        }
        Self::Portable
    }
}
