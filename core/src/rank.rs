//! Nested-rank rules of a DyLoRA adapter.
//!
//! An adapter holds, per module, `A` of shape `[r_max, in]` and `B` of shape `[out, r_max]`. The
//! rank-`r` adapter is the leading slice `A[:r, :]`, `B[:, :r]` applied with scale `alpha / r`
//! (or `alpha / sqrt(r)` for rsLoRA). Stored rank slice by rank slice (slice `k` = row `k` of
//! every `A` and column `k` of every `B`), the rank-`r` adapter is a byte prefix: `header + r *
//! slice`. This module does that arithmetic; the file layout itself lives in `qdylora-formats`.

use crate::element::ElementType;
use crate::error::{Buffer, Error, check_len};

/// How the LoRA scale depends on the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Scaling {
    /// `alpha / r` (LoRA, DyLoRA).
    AlphaOverRank,
    /// `alpha / sqrt(r)` (rsLoRA).
    AlphaOverSqrtRank,
}

impl Scaling {
    /// The scale at rank `r` (`r >= 1`).
    pub fn scale(self, alpha: f32, r: u32) -> f32 {
        match self {
            Scaling::AlphaOverRank => alpha / r as f32,
            Scaling::AlphaOverSqrtRank => alpha / libm::sqrtf(r as f32),
        }
    }
}

/// The in and out features of one adapted linear (`W: [out, in]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ModuleShape {
    /// Columns of `W` and of `A`.
    pub in_features: u32,
    /// Rows of `W` and of `B`.
    pub out_features: u32,
}

impl ModuleShape {
    /// Elements one rank adds to this module: a row of `A` and a column of `B`.
    pub const fn elements_per_rank(self) -> u64 {
        self.in_features as u64 + self.out_features as u64
    }
}

/// How a file lays the slices out: a fixed header, then slices padded to an alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PrefixLayout {
    /// Bytes before the first slice.
    pub header_bytes: u64,
    /// Each slice is padded to a multiple of this (a power of two, at least 1).
    pub slice_align: u64,
}

/// A description of a nested adapter: enough to size any rank prefix and pick a rank.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct AdapterShape<'a> {
    /// The adapted modules, in file order.
    pub modules: &'a [ModuleShape],
    /// The largest rank stored.
    pub r_max: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// Element type of `A` and `B`.
    pub dtype: ElementType,
    /// Scale rule.
    pub scaling: Scaling,
}

impl AdapterShape<'_> {
    /// Rejects an adapter without modules, with `r_max == 0` or with a zero dimension.
    pub fn validate(&self) -> Result<(), Error> {
        if self.modules.is_empty() || self.r_max == 0 {
            return Err(Error::EmptyAdapter);
        }
        for m in self.modules {
            if m.in_features == 0 || m.out_features == 0 {
                return Err(Error::Shape {
                    expected: 1,
                    actual: 0,
                });
            }
        }
        Ok(())
    }

    /// Checks `1 <= r <= r_max`.
    pub fn check_rank(&self, r: u32) -> Result<(), Error> {
        if r == 0 || r > self.r_max {
            Err(Error::RankOutOfRange {
                rank: r,
                r_max: self.r_max,
            })
        } else {
            Ok(())
        }
    }

    /// The scale applied at rank `r`.
    pub fn scale(&self, r: u32) -> Result<f32, Error> {
        self.check_rank(r)?;
        Ok(self.scaling.scale(self.alpha, r))
    }

    /// Elements in one rank slice: `sum(in + out)` over modules.
    pub fn slice_elements(&self) -> Result<u64, Error> {
        self.modules.iter().try_fold(0u64, |acc, m| {
            acc.checked_add(m.elements_per_rank())
                .ok_or(Error::SizeOverflow)
        })
    }

    /// The size math alone, from the slice element count.
    pub fn sizes(&self) -> Result<PrefixSizes, Error> {
        Ok(PrefixSizes {
            slice_elements: self.slice_elements()?,
            r_max: self.r_max,
            dtype: self.dtype,
        })
    }

    /// Bytes in one rank slice, padded to `layout.slice_align`.
    pub fn slice_bytes(&self, layout: PrefixLayout) -> Result<u64, Error> {
        self.sizes()?.slice_bytes(layout)
    }

    /// Bytes of the prefix holding ranks `1..=r` (`r = 0` is the header alone).
    pub fn prefix_bytes(&self, layout: PrefixLayout, r: u32) -> Result<u64, Error> {
        self.sizes()?.prefix_bytes(layout, r)
    }

    /// The largest rank whose prefix fits `budget` bytes; an error when even rank 1 does not.
    pub fn max_rank_within(&self, layout: PrefixLayout, budget: u64) -> Result<u32, Error> {
        self.validate()?;
        self.sizes()?.max_rank_within(layout, budget)
    }
}

/// The byte sizes of a nested adapter's prefixes, from its per-slice element count alone.
///
/// [`AdapterShape`] computes its sizes through this type; a reader without an allocator (which
/// cannot build a `[ModuleShape]` from a file) sums the module table once and uses it directly,
/// so writer and reader share one piece of arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PrefixSizes {
    /// Elements in one rank slice: `sum(in + out)` over modules.
    pub slice_elements: u64,
    /// The largest rank stored.
    pub r_max: u32,
    /// Element type of `A` and `B`.
    pub dtype: ElementType,
}

impl PrefixSizes {
    /// Bytes in one rank slice, padded to `layout.slice_align`.
    pub fn slice_bytes(&self, layout: PrefixLayout) -> Result<u64, Error> {
        let raw = self
            .slice_elements
            .checked_mul(self.dtype.size_bytes() as u64)
            .ok_or(Error::SizeOverflow)?;
        let align = layout.slice_align.max(1);
        raw.checked_next_multiple_of(align)
            .ok_or(Error::SizeOverflow)
    }

    /// Bytes of the prefix holding ranks `1..=r` (`r = 0` is the header alone).
    pub fn prefix_bytes(&self, layout: PrefixLayout, r: u32) -> Result<u64, Error> {
        if r > self.r_max {
            return Err(Error::RankOutOfRange {
                rank: r,
                r_max: self.r_max,
            });
        }
        self.slice_bytes(layout)?
            .checked_mul(u64::from(r))
            .and_then(|s| s.checked_add(layout.header_bytes))
            .ok_or(Error::SizeOverflow)
    }

    /// The largest rank whose prefix fits `budget` bytes; an error when even rank 1 does not.
    pub fn max_rank_within(&self, layout: PrefixLayout, budget: u64) -> Result<u32, Error> {
        if self.r_max == 0 || self.slice_elements == 0 {
            return Err(Error::EmptyAdapter);
        }
        let rank_one_bytes = self.prefix_bytes(layout, 1)?;
        if budget < rank_one_bytes {
            return Err(Error::BudgetTooSmall {
                budget,
                rank_one_bytes,
            });
        }
        let slice = self.slice_bytes(layout)?;
        let fitting = (budget - layout.header_bytes) / slice;
        Ok(fitting.min(u64::from(self.r_max)) as u32)
    }
}

/// The rank-`r` rows of `A` (`[r_max, in]`, row-major): its first `r * in` elements.
pub fn a_prefix<T>(a: &[T], in_features: usize, r_max: usize, r: usize) -> Result<&[T], Error> {
    check_len(Buffer::Weights, r_max * in_features, a.len())?;
    if r == 0 || r > r_max {
        return Err(Error::RankOutOfRange {
            rank: r as u32,
            r_max: r_max as u32,
        });
    }
    Ok(&a[..r * in_features])
}

/// Copies the rank-`r` columns of `B` (`[out, r_max]`, row-major) into `dst` (`[out, r]`).
pub fn b_prefix_into<T: Copy>(
    b: &[T],
    out_features: usize,
    r_max: usize,
    r: usize,
    dst: &mut [T],
) -> Result<(), Error> {
    check_len(Buffer::Weights, out_features * r_max, b.len())?;
    if r == 0 || r > r_max {
        return Err(Error::RankOutOfRange {
            rank: r as u32,
            r_max: r_max as u32,
        });
    }
    check_len(Buffer::Output, out_features * r, dst.len())?;
    for (row, out) in b.chunks(r_max).zip(dst.chunks_mut(r)) {
        out.copy_from_slice(&row[..r]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODULES: [ModuleShape; 2] = [
        ModuleShape {
            in_features: 96,
            out_features: 32,
        },
        ModuleShape {
            in_features: 200,
            out_features: 96,
        },
    ];

    fn shape() -> AdapterShape<'static> {
        AdapterShape {
            modules: &MODULES,
            r_max: 8,
            alpha: 16.0,
            dtype: ElementType::F16,
            scaling: Scaling::AlphaOverRank,
        }
    }

    #[test]
    fn sizes_and_budget() {
        let layout = PrefixLayout {
            header_bytes: 128,
            slice_align: 64,
        };
        let s = shape();
        // (96 + 32 + 200 + 96) * 2 = 848 bytes, padded to 896.
        assert_eq!(s.slice_bytes(layout).unwrap(), 896);
        assert_eq!(s.prefix_bytes(layout, 3).unwrap(), 128 + 3 * 896);
        assert_eq!(s.max_rank_within(layout, 128 + 3 * 896).unwrap(), 3);
        assert_eq!(s.max_rank_within(layout, 128 + 3 * 896 - 1).unwrap(), 2);
        assert_eq!(s.max_rank_within(layout, u64::MAX).unwrap(), 8);
        assert_eq!(
            s.max_rank_within(layout, 500),
            Err(Error::BudgetTooSmall {
                budget: 500,
                rank_one_bytes: 1024
            })
        );
        assert_eq!(s.scale(4).unwrap(), 4.0);
        assert!(s.scale(0).is_err() && s.scale(9).is_err());
    }

    #[test]
    fn slicing() {
        let a: [u8; 6] = [1, 2, 3, 4, 5, 6]; // r_max 3, in 2
        assert_eq!(a_prefix(&a, 2, 3, 2).unwrap(), &[1, 2, 3, 4]);
        let b: [u8; 6] = [1, 2, 3, 4, 5, 6]; // out 2, r_max 3
        let mut dst = [0u8; 4];
        b_prefix_into(&b, 2, 3, 2, &mut dst).unwrap();
        assert_eq!(dst, [1, 2, 4, 5]);
        assert!(a_prefix(&a, 2, 3, 4).is_err());
    }
}
