//! Loading the adapter as a device with a fixed RAM budget does: read the bundle's header from
//! storage, find the largest rank whose byte prefix fits the budget, copy exactly that prefix into
//! RAM, and use it from there.
//!
//! The rank is the one the budget affords, or nothing: a stored bundle that is cut short or
//! damaged inside that prefix is an error rather than a silently smaller adapter, because a
//! device image whose adapter lost ranks is a broken image.

use qdylora_formats::bundle::{BundleReader, RankView};

use crate::FirmwareError;

/// The adapter in RAM at the rank the budget affords.
pub struct LoadedAdapter<'ram> {
    /// The adapter at that rank, reading `A` and `B` from RAM.
    pub view: RankView<'ram>,
    /// Bytes copied into RAM (the rank's prefix).
    pub bytes: usize,
}

/// Loads the rank-`r` prefix of `stored` (a bundle file) into `ram` for the largest `r` whose
/// prefix fits in `ram.len()` bytes, after checking that the adapter was trained on the model
/// whose fingerprint is `model_fingerprint`.
pub fn load<'ram>(
    stored: &[u8],
    ram: &'ram mut [u8],
    model_fingerprint: [u8; 16],
) -> Result<LoadedAdapter<'ram>, FirmwareError> {
    let budget = ram.len();
    let header_len = BundleReader::header_len_of(stored)?;
    // `parse` reports a header longer than its buffer as truncated.
    let header = BundleReader::parse(&stored[..header_len.min(stored.len())])?;
    if header.fingerprint() != model_fingerprint {
        return Err(FirmwareError::FingerprintMismatch {
            model: model_fingerprint,
            bundle: header.fingerprint(),
        });
    }

    let rank = affordable_rank(&header, budget)?;
    let needed = header.prefix_len(rank)?;
    let prefix = stored.get(..needed).ok_or(FirmwareError::BundleTruncated {
        rank,
        needed,
        available: stored.len(),
    })?;
    // `needed <= budget` by the choice of rank; checked anyway rather than trusted.
    let ram = ram
        .get_mut(..needed)
        .ok_or(qdylora_core::Error::BudgetTooSmall {
            budget: budget as u64,
            rank_one_bytes: needed as u64,
        })?;
    ram.copy_from_slice(prefix);
    let ram: &'ram [u8] = ram;

    // Parse again from RAM: the copy is what the decoder reads, so its checksums are the ones
    // that count.
    let reader = BundleReader::parse(ram)?;
    let intact = reader.complete_rank();
    if intact < rank {
        return Err(FirmwareError::BundleDamaged { rank, intact });
    }
    // The reader's own budget math, over the whole prefix, must pick the same rank.
    let reader_rank = reader.rank_for_budget(budget as u64)?;
    if reader_rank != rank {
        return Err(FirmwareError::RankDisagreement {
            header: rank,
            reader: reader_rank,
        });
    }
    Ok(LoadedAdapter {
        view: reader.at_rank(rank)?,
        bytes: needed,
    })
}

/// The largest rank whose prefix fits `budget` bytes, from the header alone.
///
/// `BundleReader::rank_for_budget` also bounds the rank by the slices the buffer holds, so over a
/// header it has no answer; this asks the reader's `prefix_len` for each rank instead.
fn affordable_rank(header: &BundleReader<'_>, budget: usize) -> Result<u32, FirmwareError> {
    let fits = |r: u32| header.prefix_len(r).is_ok_and(|len| len <= budget);
    match (1..=header.r_max()).rev().find(|&r| fits(r)) {
        Some(rank) => Ok(rank),
        None => Err(qdylora_core::Error::BudgetTooSmall {
            budget: budget as u64,
            rank_one_bytes: header.prefix_len(1)? as u64,
        }
        .into()),
    }
}
