//! The error type of the writers and the safetensors bridges.

use std::path::PathBuf;
use std::string::String;
use std::vec::Vec;

use crate::error::FormatError;

/// Everything the std side can fail with. Paths name the file (or, for bytes parsed in memory,
/// the file they stand for).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file does not parse, or does not have the fields and types expected.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A safetensors file is malformed (header, offsets, sizes).
    #[error("{}: invalid safetensors: {source}", path.display())]
    SafeTensors {
        /// The file.
        path: PathBuf,
        /// The safetensors crate's error.
        source: safetensors::SafeTensorError,
    },
    /// A tensor the format requires is absent.
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor {
        /// The file (or folder, for sharded checkpoints).
        path: PathBuf,
        /// The key.
        name: String,
    },
    /// A tensor the format does not know (it would otherwise be silently dropped).
    #[error("{}: unexpected tensor `{name}`", path.display())]
    UnexpectedTensor {
        /// The file.
        path: PathBuf,
        /// The key.
        name: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}: tensor `{name}` has shape {actual:?}, expected {expected:?}", path.display())]
    Shape {
        /// The file.
        path: PathBuf,
        /// The key.
        name: String,
        /// The shape required.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
    },
    /// A tensor has a dtype this bridge does not accept there.
    #[error("{}: tensor `{name}` has dtype {actual}, expected {expected}", path.display())]
    DType {
        /// The file.
        path: PathBuf,
        /// The key.
        name: String,
        /// What is accepted.
        expected: String,
        /// What was found.
        actual: String,
    },
    /// A tensor holds an infinity or NaN.
    #[error("tensor `{name}`: non-finite value at flat index {index}")]
    NonFinite {
        /// The key or module name.
        name: String,
        /// The flat index of the first one.
        index: usize,
    },
    /// A configuration asks for something this project does not support.
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What, and why.
        what: String,
    },
    /// A reader rejected bytes (our own formats).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The core rejected a shape or value.
    #[error(transparent)]
    Core(#[from] qdylora_core::Error),
    /// Arguments that cannot make a valid file.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Error::Json {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn unsupported(path: impl Into<PathBuf>, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.into(),
            what: what.into(),
        }
    }
}
