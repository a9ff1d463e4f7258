//! Which instruction set the kernels run on: picked at run time, or forced (tests, benchmarks).

/// A kernel implementation. Every one gives the same results: bit-identical for dequantization,
/// equal up to f32 summation order for dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, any CPU.
    Scalar,
    /// x86-64 AVX2 + FMA.
    Avx2Fma,
}

impl Isa {
    /// The fastest implementation this CPU supports.
    pub fn detect() -> Self {
        if Isa::Avx2Fma.is_supported() {
            Isa::Avx2Fma
        } else {
            Isa::Scalar
        }
    }

    /// Whether this CPU can run it.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2Fma => false,
        }
    }

    /// Proof that this CPU supports `self`, or an error: the kernels never run an instruction
    /// the CPU lacks.
    pub(crate) fn checked(self) -> Result<Supported, super::KernelError> {
        if self.is_supported() {
            Ok(Supported(self))
        } else {
            Err(super::KernelError::UnsupportedIsa(self))
        }
    }
}

/// An [`Isa`] this CPU was checked to support; only [`Isa::checked`] makes one.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Supported(Isa);

impl Supported {
    /// The checked instruction set.
    pub fn isa(self) -> Isa {
        self.0
    }
}
