//! The CPU side shared by the fused ops: their element types, and one pass over inputs of one
//! dtype into a new output of that dtype.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, WithDType};
use half::bf16;

/// A stored element type of the fused ops' tensors (f32 or bf16), computed in f32.
pub trait Element: WithDType + Copy + Send + Sync {
    /// Widens to f32 (exact for both types).
    fn widen(self) -> f32;
    /// Rounds to nearest, ties to even.
    fn narrow(v: f32) -> Self;
}

impl Element for f32 {
    fn widen(self) -> f32 {
        self
    }
    fn narrow(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The contiguous values of a CPU tensor (an error for another dtype).
pub fn cpu_slice<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
) -> candle_core::Result<&'a [T]> {
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("fused op: the inputs must be contiguous");
    };
    Ok(&storage.as_slice::<T>()?[start..end])
}

/// The CPU side of one pass over `inputs` (one dtype, one shape): the output has their shape.
pub fn cpu_pass(
    op: &str,
    inputs: &[(&CpuStorage, &Layout)],
    f: impl Fn(Inputs<'_>) -> CpuStorage,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let layouts: Vec<&Layout> = inputs.iter().map(|(_, l)| *l).collect();
    let shape = super::common_shape(op, &layouts)?.clone();
    Ok((f(cpu_inputs(op, inputs)?), shape))
}

/// The values of contiguous `inputs` of one dtype (f32 or bf16), any shapes.
pub fn cpu_inputs<'a>(
    op: &str,
    inputs: &[(&'a CpuStorage, &Layout)],
) -> candle_core::Result<Inputs<'a>> {
    let dtype = inputs[0].0.dtype();
    if let Some((other, _)) = inputs.iter().find(|(s, _)| s.dtype() != dtype) {
        candle_core::bail!(
            "{op}: the inputs' dtypes differ: {dtype:?}, {:?}",
            other.dtype()
        );
    }
    Ok(match dtype {
        DType::F32 => Inputs::F32(
            inputs
                .iter()
                .map(|(s, l)| cpu_slice::<f32>(s, l))
                .collect::<candle_core::Result<_>>()?,
        ),
        DType::BF16 => Inputs::Bf16(
            inputs
                .iter()
                .map(|(s, l)| cpu_slice::<bf16>(s, l))
                .collect::<candle_core::Result<_>>()?,
        ),
        other => candle_core::bail!("{op}: f32 or bf16 tensors, got {other:?}"),
    })
}

/// The inputs of one CPU pass, as slices of their dtype.
pub enum Inputs<'a> {
    /// f32 tensors.
    F32(Vec<&'a [f32]>),
    /// bf16 tensors.
    Bf16(Vec<&'a [bf16]>),
}

/// Runs `$body` with `$v` bound to the inputs' slices and `$out` to a new output of their
/// dtype, as long as the first input (or `$len` values, an expression that may read `$v`),
/// and returns the output as storage.
macro_rules! each_dtype {
    ($inputs:expr, |$v:ident, $out:ident| $body:expr) => {
        $crate::model::fused::cpu::each_dtype!($inputs, len = $v[0].len(), |$v, $out| $body)
    };
    ($inputs:expr, len = $len:expr, |$v:ident, $out:ident| $body:expr) => {
        match $inputs {
            $crate::model::fused::cpu::Inputs::F32($v) => {
                let mut $out = vec![0f32; $len];
                $body;
                candle_core::CpuStorage::F32($out)
            }
            $crate::model::fused::cpu::Inputs::Bf16($v) => {
                let mut $out = vec![half::bf16::ZERO; $len];
                $body;
                candle_core::CpuStorage::BF16($out)
            }
        }
    };
}
pub(crate) use each_dtype;
