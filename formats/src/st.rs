//! Shared safetensors plumbing for the bridges: parsing with the file named in errors, reading
//! float tensors as f32, and writing files the way `safetensors.torch.save_file` does.

use std::collections::HashMap;
use std::path::Path;
use std::string::{String, ToString};
use std::vec::Vec;

use qdylora_core::ElementType;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::error_std::Error;

/// Parses a safetensors buffer (the crate validates header size, offsets and lengths).
pub(crate) fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>, Error> {
    SafeTensors::deserialize(bytes).map_err(|source| Error::SafeTensors {
        path: path.into(),
        source,
    })
}

/// The element type of a float safetensors dtype.
pub(crate) fn element_type(dtype: Dtype) -> Option<ElementType> {
    match dtype {
        Dtype::F32 => Some(ElementType::F32),
        Dtype::F16 => Some(ElementType::F16),
        Dtype::BF16 => Some(ElementType::Bf16),
        _ => None,
    }
}

/// The safetensors dtype of an element type.
pub(crate) fn st_dtype(dtype: ElementType) -> Dtype {
    match dtype {
        ElementType::F32 => Dtype::F32,
        ElementType::F16 => Dtype::F16,
        ElementType::Bf16 => Dtype::BF16,
    }
}

/// A tensor by name, or a missing-tensor error.
pub(crate) fn get<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    path: &Path,
) -> Result<TensorView<'a>, Error> {
    st.tensor(name).map_err(|_| Error::MissingTensor {
        path: path.into(),
        name: name.into(),
    })
}

/// Checks a tensor's shape.
pub(crate) fn expect_shape(
    view: &TensorView<'_>,
    name: &str,
    shape: &[usize],
    path: &Path,
) -> Result<(), Error> {
    if view.shape() == shape {
        Ok(())
    } else {
        Err(Error::Shape {
            path: path.into(),
            name: name.into(),
            expected: shape.to_vec(),
            actual: view.shape().to_vec(),
        })
    }
}

/// Checks a tensor's dtype.
pub(crate) fn expect_dtype(
    view: &TensorView<'_>,
    name: &str,
    dtype: Dtype,
    path: &Path,
) -> Result<(), Error> {
    if view.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::DType {
            path: path.into(),
            name: name.into(),
            expected: dtype.to_string(),
            actual: view.dtype().to_string(),
        })
    }
}

/// A float tensor's values widened to f32 (exact for f16 and bf16), rejecting infinities and NaN.
pub(crate) fn to_f32(
    view: &TensorView<'_>,
    name: &str,
    path: &Path,
) -> Result<(ElementType, Vec<f32>), Error> {
    let dtype = element_type(view.dtype()).ok_or_else(|| Error::DType {
        path: path.into(),
        name: name.into(),
        expected: "F32, F16 or BF16".into(),
        actual: view.dtype().to_string(),
    })?;
    let values: Vec<f32> = view
        .data()
        .chunks_exact(dtype.size_bytes())
        .map(|b| dtype.decode_le(b))
        .collect();
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            name: name.into(),
            index,
        });
    }
    Ok((dtype, values))
}

/// An f32 tensor's values (the bnb side tensors, which must be exactly f32).
pub(crate) fn f32_exact(view: &TensorView<'_>, name: &str, path: &Path) -> Result<Vec<f32>, Error> {
    expect_dtype(view, name, Dtype::F32, path)?;
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// An owned tensor on its way into a file.
pub(crate) struct Owned {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Owned {
    pub(crate) fn floats(dtype: ElementType, shape: Vec<usize>, values: &[f32]) -> Self {
        Self {
            dtype: st_dtype(dtype),
            shape,
            data: crate::encode::to_le_bytes(dtype, values),
        }
    }

    pub(crate) fn f32s(shape: Vec<usize>, values: &[f32]) -> Self {
        Self::floats(ElementType::F32, shape, values)
    }

    pub(crate) fn u8s(shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self {
            dtype: Dtype::U8,
            shape,
            data,
        }
    }
}

/// A safetensors file as `safetensors.torch.save_file(..., metadata={"format": "pt"})` writes
/// it: tensors ordered by dtype alignment, then name (the crate's order, which torch's shares).
pub(crate) fn serialize(tensors: Vec<(String, Owned)>, path: &Path) -> Result<Vec<u8>, Error> {
    let views = tensors
        .iter()
        .map(|(name, t)| {
            TensorView::new(t.dtype, t.shape.clone(), &t.data)
                .map(|v| (name.as_str(), v))
                .map_err(|source| Error::SafeTensors {
                    path: path.into(),
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|source| Error::SafeTensors {
        path: path.into(),
        source,
    })
}

/// Rejects a tensor whose values would round to an infinity in `dtype`.
pub(crate) fn check_representable(
    name: &str,
    dtype: ElementType,
    values: &[f32],
) -> Result<(), Error> {
    match values
        .iter()
        .position(|&v| !crate::encode::round_to(dtype, v).is_finite())
    {
        Some(index) => Err(Error::NonFinite {
            name: name.into(),
            index,
        }),
        None => Ok(()),
    }
}
