//! The `no_std`, zero-copy bundle reader.

use core::cmp::Ordering;

use qdylora_core::ElementType;
use qdylora_core::rank::{PrefixSizes, Scaling};

use super::{
    FIXED_HEADER_LEN, MAGIC, MODULE_ENTRY_LEN, SLICE_ALIGN, VERSION, crc_table_offset,
    dtype_from_code, field, header_len_for, layout, limits, scaling_from_code,
};
use crate::elem_view::ElemView;
use crate::error::{Field, FormatError};
use crate::le::{self, region, to_usize};

/// One adapted linear as the module table lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleInfo<'a> {
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub name: &'a str,
    /// Columns of `A` (the linear's input width).
    pub in_features: u32,
    /// Rows of `B` (the linear's output width).
    pub out_features: u32,
}

/// A parsed bundle over borrowed bytes: the whole file, or any prefix of it that holds the header.
///
/// `parse` checks the header (including its checksum) and the module table, then the checksum of
/// every whole slice present; [`BundleReader::complete_rank`] is the number of leading slices
/// that are whole and intact.
#[derive(Debug, Clone, Copy)]
pub struct BundleReader<'a> {
    bytes: &'a [u8],
    header_len: usize,
    slice_len: usize,
    sizes: PrefixSizes,
    module_count: u32,
    names_len: u32,
    alpha: f32,
    scaling: Scaling,
    fingerprint: [u8; 16],
    complete_rank: u32,
}

/// A module table entry, decoded.
struct Entry {
    name_offset: u32,
    name_len: u32,
    in_features: u32,
    out_features: u32,
    slice_offset: u64,
}

impl<'a> BundleReader<'a> {
    /// The header length a bundle declares, from its first 64 bytes alone: a device reads this
    /// many bytes, parses them, and then asks [`BundleReader::prefix_len`] how much more to read.
    pub fn header_len_of(bytes: &[u8]) -> Result<usize, FormatError> {
        check_fixed(bytes)?;
        to_usize(
            u64::from(le::u32_at(bytes, field::HEADER_LEN)),
            Field::HeaderLen,
        )
    }

    /// Parses a bundle (or a prefix of one that holds at least the whole header).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        check_fixed(bytes)?;
        let header_len = u64::from(le::u32_at(bytes, field::HEADER_LEN));
        let header = le::checked_header(
            bytes,
            header_len,
            FIXED_HEADER_LEN,
            SLICE_ALIGN,
            field::HEADER_CRC,
            FIXED_HEADER_LEN,
        )?;

        let dtype_code = le::u8_at(header, field::DTYPE);
        let dtype = dtype_from_code(dtype_code).ok_or(FormatError::InvalidValue {
            field: Field::ElementType,
            value: dtype_code.into(),
        })?;
        let scaling_code = le::u8_at(header, field::SCALING);
        let scaling = scaling_from_code(scaling_code).ok_or(FormatError::InvalidValue {
            field: Field::Scaling,
            value: scaling_code.into(),
        })?;
        let r_max = checked_count(header, field::R_MAX, Field::RMax, limits::MAX_RANK)?;
        let module_count = checked_count(
            header,
            field::MODULE_COUNT,
            Field::ModuleCount,
            limits::MAX_MODULES,
        )?;
        let names_len = le::u32_at(header, field::NAMES_LEN);
        if names_len > limits::MAX_NAMES_LEN {
            return Err(FormatError::TooLarge {
                field: Field::NamesLen,
                value: names_len.into(),
                limit: limits::MAX_NAMES_LEN.into(),
            });
        }
        let alpha = le::f32_at(header, field::ALPHA);
        if !alpha.is_finite() {
            return Err(FormatError::InvalidValue {
                field: Field::Alpha,
                value: alpha.to_bits().into(),
            });
        }
        let reserved = le::u32_at(header, field::RESERVED);
        if reserved != 0 {
            return Err(FormatError::InvalidValue {
                field: Field::Reserved,
                value: reserved.into(),
            });
        }
        if header_len_for(module_count, names_len, r_max) != Some(header_len) {
            return Err(FormatError::InvalidValue {
                field: Field::HeaderLen,
                value: header_len,
            });
        }

        let mut reader = Self {
            bytes,
            header_len: to_usize(header_len, Field::HeaderLen)?,
            slice_len: 0,
            sizes: PrefixSizes {
                slice_elements: 0,
                r_max,
                dtype,
            },
            module_count,
            names_len,
            alpha,
            scaling,
            fingerprint: le::bytes16_at(header, field::FINGERPRINT),
            complete_rank: 0,
        };
        reader.sizes.slice_elements = reader.check_module_table()?;

        let slice_len = reader.sizes.slice_bytes(layout(header_len))?;
        let stored_slice_len = le::u64_at(header, field::SLICE_LEN);
        if stored_slice_len != slice_len {
            return Err(FormatError::InvalidValue {
                field: Field::SliceLen,
                value: stored_slice_len,
            });
        }
        reader.slice_len = to_usize(slice_len, Field::SliceLen)?;
        let file_len = reader.sizes.prefix_bytes(layout(header_len), r_max)?;
        if bytes.len() as u64 > file_len {
            return Err(FormatError::TrailingBytes {
                expected_len: file_len,
                actual_len: bytes.len() as u64,
            });
        }
        reader.complete_rank = reader.count_intact_slices();
        Ok(reader)
    }

    /// Checks every module table entry and returns the elements of one slice.
    fn check_module_table(&self) -> Result<u64, FormatError> {
        let size = self.sizes.dtype.size_bytes() as u64;
        let mut names_end = 0u32;
        let mut slice_elements = 0u64;
        let mut previous: &[u8] = &[];
        for index in 0..self.module_count {
            let e = self.entry(index);
            if e.name_offset != names_end {
                return Err(if e.name_offset < names_end {
                    FormatError::Overlap {
                        field: Field::ModuleName,
                        index,
                        offset: e.name_offset.into(),
                    }
                } else {
                    FormatError::InvalidValue {
                        field: Field::ModuleName,
                        value: e.name_offset.into(),
                    }
                });
            }
            let name =
                self.name_bytes(e.name_offset, e.name_len)
                    .ok_or(FormatError::OutOfBounds {
                        field: Field::ModuleName,
                        index,
                        offset: e.name_offset.into(),
                        len: e.name_len.into(),
                    })?;
            if name.is_empty()
                || core::str::from_utf8(name).is_err()
                || (index > 0 && name <= previous)
            {
                return Err(FormatError::BadName {
                    field: Field::ModuleName,
                    index,
                });
            }
            for dim in [e.in_features, e.out_features] {
                if dim == 0 || dim > limits::MAX_FEATURES {
                    return Err(FormatError::InvalidValue {
                        field: Field::ModuleShape,
                        value: dim.into(),
                    });
                }
            }
            if Some(e.slice_offset) != slice_elements.checked_mul(size) {
                return Err(FormatError::InvalidValue {
                    field: Field::ModuleOffset,
                    value: e.slice_offset,
                });
            }
            slice_elements = slice_elements
                .checked_add(u64::from(e.in_features) + u64::from(e.out_features))
                .ok_or(FormatError::Core(qdylora_core::Error::SizeOverflow))?;
            names_end = e.name_offset + e.name_len;
            previous = name;
        }
        if names_end != self.names_len {
            return Err(FormatError::InvalidValue {
                field: Field::NamesLen,
                value: self.names_len.into(),
            });
        }
        Ok(slice_elements)
    }

    /// How many leading slices are whole and match their checksum.
    fn count_intact_slices(&self) -> u32 {
        let present = (self.bytes.len() - self.header_len) / self.slice_len;
        let present = present.min(self.sizes.r_max as usize) as u32;
        (0..present)
            .find(|&k| {
                let start = self.header_len + k as usize * self.slice_len;
                let slice = &self.bytes[start..start + self.slice_len];
                !le::checksum_ok(self.slice_crc(k), le::crc32(&[slice]))
            })
            .unwrap_or(present)
    }

    /// Entry `index` of the module table (the table is inside the checked header).
    fn entry(&self, index: u32) -> Entry {
        let at = FIXED_HEADER_LEN + index as usize * MODULE_ENTRY_LEN;
        Entry {
            name_offset: le::u32_at(self.bytes, at),
            name_len: le::u32_at(self.bytes, at + 4),
            in_features: le::u32_at(self.bytes, at + 8),
            out_features: le::u32_at(self.bytes, at + 12),
            slice_offset: le::u64_at(self.bytes, at + 16),
        }
    }

    fn name_bytes(&self, offset: u32, len: u32) -> Option<&'a [u8]> {
        let names_start = FIXED_HEADER_LEN + self.module_count as usize * MODULE_ENTRY_LEN;
        let names = self
            .bytes
            .get(names_start..names_start + self.names_len as usize)?;
        names.get(offset as usize..(offset as usize).checked_add(len as usize)?)
    }

    fn slice_crc(&self, k: u32) -> u32 {
        let at = crc_table_offset(self.module_count, self.names_len) as usize + 4 * k as usize;
        le::u32_at(self.bytes, at)
    }

    /// The largest rank stored in the complete file.
    pub fn r_max(&self) -> u32 {
        self.sizes.r_max
    }

    /// LoRA alpha.
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// Element type of `A` and `B`.
    pub fn dtype(&self) -> ElementType {
        self.sizes.dtype
    }

    /// How the scale depends on the rank.
    pub fn scaling(&self) -> Scaling {
        self.scaling
    }

    /// The scale applied at rank `r` (`1..=r_max`).
    pub fn scale(&self, r: u32) -> Result<f32, FormatError> {
        if r == 0 || r > self.sizes.r_max {
            return Err(FormatError::Core(qdylora_core::Error::RankOutOfRange {
                rank: r,
                r_max: self.sizes.r_max,
            }));
        }
        Ok(self.scaling.scale(self.alpha, r))
    }

    /// The fingerprint of the base model the adapter was trained on.
    pub fn fingerprint(&self) -> [u8; 16] {
        self.fingerprint
    }

    /// Number of adapted modules.
    pub fn module_count(&self) -> usize {
        self.module_count as usize
    }

    /// Module `i` (modules are sorted by name).
    pub fn module(&self, i: usize) -> Result<ModuleInfo<'a>, FormatError> {
        let index = self.check_module_index(i)?;
        let e = self.entry(index);
        let name = self
            .name_bytes(e.name_offset, e.name_len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .ok_or(FormatError::BadName {
                field: Field::ModuleName,
                index,
            })?;
        Ok(ModuleInfo {
            name,
            in_features: e.in_features,
            out_features: e.out_features,
        })
    }

    /// The index of the module called `name`.
    pub fn find_module(&self, name: &str) -> Option<usize> {
        self.find_module_by(|entry_name| entry_name.cmp(name.as_bytes()))
    }

    /// Binary search with `cmp` ordering a table name against the key.
    pub(crate) fn find_module_by(&self, cmp: impl Fn(&[u8]) -> Ordering) -> Option<usize> {
        le::search(self.module_count as usize, |i| {
            let e = self.entry(i as u32);
            self.name_bytes(e.name_offset, e.name_len)
                .map_or(Ordering::Greater, &cmp)
        })
    }

    /// The largest rank whose slices are all present and intact in this buffer.
    pub fn complete_rank(&self) -> u32 {
        self.complete_rank
    }

    /// Bytes before the first slice.
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// Bytes of one slice (padding included).
    pub fn slice_len(&self) -> usize {
        self.slice_len
    }

    /// Bytes of the rank-`r` adapter: `header_len + r * slice_len` (`r <= r_max`; 0 gives the
    /// header alone).
    pub fn prefix_len(&self, r: u32) -> Result<usize, FormatError> {
        let bytes = self.sizes.prefix_bytes(layout(self.header_len as u64), r)?;
        to_usize(bytes, Field::FileLen)
    }

    /// The largest rank that fits `budget_bytes` (by [`PrefixSizes::max_rank_within`]) and that
    /// this buffer holds intact.
    pub fn rank_for_budget(&self, budget_bytes: u64) -> Result<u32, FormatError> {
        let fitting = self
            .sizes
            .max_rank_within(layout(self.header_len as u64), budget_bytes)?;
        if self.complete_rank == 0 {
            return Err(FormatError::RankUnavailable {
                rank: 1,
                complete_rank: 0,
            });
        }
        Ok(fitting.min(self.complete_rank))
    }

    /// Row `k` of module `module`'s `A` (`in` elements), `k < complete_rank()`.
    pub fn a_row(&self, module: usize, k: u32) -> Result<ElemView<'a>, FormatError> {
        let (offset, in_features, _) = self.pair_location(module, k)?;
        self.view(offset, in_features)
    }

    /// Column `k` of module `module`'s `B` (`out` elements), `k < complete_rank()`.
    pub fn b_col(&self, module: usize, k: u32) -> Result<ElemView<'a>, FormatError> {
        let (offset, in_features, out_features) = self.pair_location(module, k)?;
        let a_bytes = u64::from(in_features) * self.sizes.dtype.size_bytes() as u64;
        self.view(offset + a_bytes, out_features)
    }

    /// The adapter at rank `r` (`1..=complete_rank()`), as a [`qdylora_core::infer::LinearDelta`].
    pub fn at_rank(&self, r: u32) -> Result<super::RankView<'a>, FormatError> {
        if r == 0 || r > self.complete_rank {
            return Err(FormatError::RankUnavailable {
                rank: r,
                complete_rank: self.complete_rank,
            });
        }
        Ok(super::RankView::new(
            *self,
            r,
            self.scaling.scale(self.alpha, r),
        ))
    }

    /// Module `module`'s factors at rank `r` (`1..=complete_rank()`) as f32: `A[:r, :]` as
    /// `[r, in]` and `B[:, :r]` as `[out, r]`, both row-major.
    #[cfg(feature = "std")]
    pub fn factors_at_rank(
        &self,
        module: usize,
        r: u32,
    ) -> Result<(std::vec::Vec<f32>, std::vec::Vec<f32>), FormatError> {
        use qdylora_core::ElementSource;
        if r == 0 || r > self.complete_rank {
            return Err(FormatError::RankUnavailable {
                rank: r,
                complete_rank: self.complete_rank,
            });
        }
        let info = self.module(module)?;
        let (rank, out) = (r as usize, info.out_features as usize);
        let mut a = std::vec::Vec::with_capacity(rank * info.in_features as usize);
        let mut b = std::vec![0.0f32; out * rank];
        for k in 0..r {
            a.extend_from_slice(&self.a_row(module, k)?.to_f32_vec());
            let col = self.b_col(module, k)?;
            for j in 0..out {
                b[j * rank + k as usize] = col.get(j);
            }
        }
        Ok((a, b))
    }

    /// Byte offset of module `module`'s pair in slice `k`, and its shape.
    fn pair_location(&self, module: usize, k: u32) -> Result<(u64, u32, u32), FormatError> {
        let index = self.check_module_index(module)?;
        if k >= self.complete_rank {
            return Err(FormatError::RankUnavailable {
                rank: k.saturating_add(1),
                complete_rank: self.complete_rank,
            });
        }
        let e = self.entry(index);
        let slice_start = self.header_len as u64 + u64::from(k) * self.slice_len as u64;
        Ok((slice_start + e.slice_offset, e.in_features, e.out_features))
    }

    fn view(&self, offset: u64, elements: u32) -> Result<ElemView<'a>, FormatError> {
        let len = u64::from(elements) * self.sizes.dtype.size_bytes() as u64;
        ElemView::new(
            region(self.bytes, Field::Slice, 0, offset, len)?,
            self.sizes.dtype,
        )
    }

    fn check_module_index(&self, i: usize) -> Result<u32, FormatError> {
        match u32::try_from(i) {
            Ok(index) if index < self.module_count => Ok(index),
            _ => Err(FormatError::IndexOutOfRange {
                field: Field::ModuleTable,
                index: u32::try_from(i).unwrap_or(u32::MAX),
                count: self.module_count,
            }),
        }
    }
}

/// Checks the magic and version in the first bytes.
fn check_fixed(bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.len() < MAGIC.len() {
        return Err(FormatError::Truncated {
            field: Field::Magic,
            needed: MAGIC.len() as u64,
            available: bytes.len() as u64,
        });
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < FIXED_HEADER_LEN {
        return Err(FormatError::Truncated {
            field: Field::HeaderLen,
            needed: FIXED_HEADER_LEN as u64,
            available: bytes.len() as u64,
        });
    }
    let version = le::u16_at(bytes, field::VERSION);
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion {
            found: version,
            supported: VERSION,
        });
    }
    Ok(())
}

/// A `u32` count that must be in `1..=limit`.
fn checked_count(header: &[u8], at: usize, field: Field, limit: u32) -> Result<u32, FormatError> {
    let value = le::u32_at(header, at);
    if value == 0 {
        return Err(FormatError::InvalidValue { field, value: 0 });
    }
    if value > limit {
        return Err(FormatError::TooLarge {
            field,
            value: value.into(),
            limit: limit.into(),
        });
    }
    Ok(value)
}
