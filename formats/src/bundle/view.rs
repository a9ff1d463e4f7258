//! The rank-`r` adapter of a bundle as a decoder's [`LinearDelta`].

use qdylora_core::infer::{LinearDelta, LinearKind};
use qdylora_core::kernels::lora_accumulate;
use qdylora_core::{Buffer, Error};

use super::BundleReader;
use crate::le;

/// A bundle applied at a fixed rank `r` with scale `scaling.scale(alpha, r)`.
///
/// For `(layer, kind)` it applies the module named `model.layers.{layer}.{kind.layer_path()}`;
/// a linear without a module adds nothing. Names are matched by binary search over the sorted
/// module table, without allocating.
#[derive(Debug, Clone, Copy)]
pub struct RankView<'a> {
    reader: BundleReader<'a>,
    rank: u32,
    scale: f32,
}

impl<'a> RankView<'a> {
    pub(super) fn new(reader: BundleReader<'a>, rank: u32, scale: f32) -> Self {
        Self {
            reader,
            rank,
            scale,
        }
    }

    /// The rank applied.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The scale applied.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// The bundle underneath.
    pub fn reader(&self) -> &BundleReader<'a> {
        &self.reader
    }

    /// The module index for a decoder linear, if the adapter has one.
    pub fn module_for(&self, layer: usize, which: LinearKind) -> Option<usize> {
        let mut digits = [0u8; 20];
        let layer = le::decimal(layer, &mut digits);
        let parts: [&[u8]; 4] = [b"model.layers.", layer, b".", which.layer_path().as_bytes()];
        self.reader
            .find_module_by(|name| le::cmp_concat(name, &parts))
    }
}

impl LinearDelta for RankView<'_> {
    fn apply(
        &self,
        layer: usize,
        which: LinearKind,
        x: &[f32],
        y: &mut [f32],
    ) -> Result<(), Error> {
        let Some(module) = self.module_for(layer, which) else {
            return Ok(());
        };
        let rank_error = Error::RankOutOfRange {
            rank: self.rank,
            r_max: self.reader.r_max(),
        };
        let info = self.reader.module(module).map_err(|_| rank_error)?;
        check(Buffer::Input, info.in_features, x.len())?;
        check(Buffer::Output, info.out_features, y.len())?;
        for k in 0..self.rank {
            let a = self.reader.a_row(module, k).map_err(|_| rank_error)?;
            let b = self.reader.b_col(module, k).map_err(|_| rank_error)?;
            lora_accumulate(core::iter::once((a, b)), self.scale, x, y)?;
        }
        Ok(())
    }
}

fn check(buffer: Buffer, expected: u32, actual: usize) -> Result<(), Error> {
    if expected as usize == actual {
        Ok(())
    } else {
        Err(Error::BufferLength {
            buffer,
            expected: expected as usize,
            actual,
        })
    }
}
