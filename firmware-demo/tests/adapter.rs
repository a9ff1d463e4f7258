//! On-target tests of `adapter::load` with the embedded demo bundle: the rank it picks for a RAM
//! budget, the bytes it copies, and the errors for bundles that are cut short, damaged, or made
//! for another base model.
//!
//! The expected rank comes from the bundle format's definition (`formats/FORMAT.md`: the rank-`r`
//! adapter is the first `header_len + r * slice_len` bytes), not from the loader.
#![no_std]
#![no_main]
#![allow(unsafe_code)] // the two static buffers below, handed out once in `init`

use qdylora_firmware_demo as _;
use qdylora_firmware_demo::FirmwareError;
use qdylora_firmware_demo::adapter::{self, LoadedAdapter};
use qdylora_firmware_demo::assets;
use qdylora_formats::bundle::BundleReader;
use qdylora_formats::device_model::DeviceModelReader;

/// Room for the whole bundle (a few hundred KB) and then some.
const BUFFER_LEN: usize = 1 << 20;

#[repr(C, align(8))]
struct Buffer([u8; BUFFER_LEN]);

/// The adapter RAM of the tests (sliced to each budget).
static mut RAM: Buffer = Buffer([0; BUFFER_LEN]);
/// A copy of the bundle to damage.
static mut COPY: Buffer = Buffer([0; BUFFER_LEN]);

struct State {
    ram: &'static mut [u8],
    copy: &'static mut [u8],
    fingerprint: [u8; 16],
    header_len: usize,
    slice_len: usize,
    r_max: u32,
}

impl State {
    /// The rank-`r` prefix length by the format's definition.
    fn prefix(&self, r: u32) -> usize {
        self.header_len + r as usize * self.slice_len
    }

    /// The largest rank whose prefix fits `budget`, by the format's definition.
    fn rank_within(&self, budget: usize) -> u32 {
        let ranks = (budget - self.header_len) / self.slice_len;
        ranks.min(self.r_max as usize) as u32
    }

    fn load(&mut self, stored: Stored, budget: usize) -> Result<LoadedAdapter<'_>, FirmwareError> {
        let stored: &[u8] = match stored {
            Stored::Embedded(len) => &assets::bundle_file()[..len],
            Stored::Copy(len) => &self.copy[..len],
        };
        adapter::load(stored, &mut self.ram[..budget], self.fingerprint)
    }

    /// Refreshes the damageable copy from the embedded bundle.
    fn reset_copy(&mut self) -> usize {
        let file = assets::bundle_file();
        self.copy[..file.len()].copy_from_slice(file);
        file.len()
    }
}

/// Which stored bundle to load, and how many of its bytes.
#[derive(Clone, Copy)]
enum Stored {
    Embedded(usize),
    Copy(usize),
}

#[defmt_test::tests]
mod tests {
    use qdylora_firmware_demo::{FirmwareError, FormatFault, assets};
    use qdylora_formats::FormatError;

    use super::{BundleReader, COPY, DeviceModelReader, RAM, State, Stored};

    #[init]
    fn init() -> State {
        let model = match DeviceModelReader::parse(assets::model_file()) {
            Ok(model) => model,
            Err(e) => defmt::panic!("model: {}", defmt::Display2Format(&e)),
        };
        let bundle = match BundleReader::parse(assets::bundle_file()) {
            Ok(bundle) => bundle,
            Err(e) => defmt::panic!("bundle: {}", defmt::Display2Format(&e)),
        };
        defmt::assert_eq!(bundle.complete_rank(), bundle.r_max());
        defmt::assert!(assets::bundle_file().len() <= super::BUFFER_LEN);
        State {
            // SAFETY: init runs once, so these are the only references to the two statics.
            ram: unsafe { &mut (*core::ptr::addr_of_mut!(RAM)).0 },
            copy: unsafe { &mut (*core::ptr::addr_of_mut!(COPY)).0 },
            fingerprint: model.fingerprint(),
            header_len: bundle.header_len(),
            slice_len: bundle.slice_len(),
            r_max: bundle.r_max(),
        }
    }

    #[test]
    fn picks_the_largest_rank_that_fits_and_copies_exactly_its_prefix(state: &mut State) {
        let file_len = assets::bundle_file().len();
        let budgets = [
            state.prefix(1),
            state.prefix(2) - 1,
            state.prefix(3),
            64 << 10,
            256 << 10,
            file_len - 1,
            file_len,
            super::BUFFER_LEN,
        ];
        for budget in budgets {
            let want = state.rank_within(budget);
            let want_bytes = state.prefix(want);
            let (rank, bytes) = match state.load(Stored::Embedded(file_len), budget) {
                Ok(a) => (a.view.rank(), a.bytes),
                Err(e) => defmt::panic!("budget {}: {}", budget, e),
            };
            defmt::assert_eq!(rank, want, "budget {}", budget);
            defmt::assert_eq!(bytes, want_bytes, "budget {}", budget);
            defmt::assert!(state.ram[..bytes] == assets::bundle_file()[..bytes]);
        }
    }

    #[test]
    fn a_budget_below_rank_one_is_an_error(state: &mut State) {
        let budget = state.prefix(1) - 1;
        let file_len = assets::bundle_file().len();
        let err = state.load(Stored::Embedded(file_len), budget).err();
        defmt::assert!(
            matches!(
                err,
                Some(FirmwareError::Core(
                    qdylora_core::Error::BudgetTooSmall { .. }
                ))
            ),
            "{}",
            err
        );
    }

    #[test]
    fn another_base_models_adapter_is_refused(state: &mut State) {
        state.fingerprint[0] ^= 1;
        let file_len = assets::bundle_file().len();
        let err = state.load(Stored::Embedded(file_len), 64 << 10).err();
        state.fingerprint[0] ^= 1;
        defmt::assert!(
            matches!(err, Some(FirmwareError::FingerprintMismatch { .. })),
            "{}",
            err
        );
    }

    #[test]
    fn a_file_cut_before_the_budgets_rank_is_truncated(state: &mut State) {
        let budget = 64 << 10;
        let rank = state.rank_within(budget);
        let cut = state.prefix(rank) - 1;
        let err = state.load(Stored::Embedded(cut), budget).err();
        defmt::assert_eq!(
            err,
            Some(FirmwareError::BundleTruncated {
                rank,
                needed: cut + 1,
                available: cut
            })
        );
        // Cut inside the header, or inside the fixed 64 bytes: the reader's typed errors.
        for cut in [state.header_len - 1, 40, 0] {
            let err = state.load(Stored::Embedded(cut), budget).err();
            defmt::assert!(
                matches!(
                    err,
                    Some(FirmwareError::Format(FormatFault(
                        FormatError::Truncated { .. }
                    )))
                ),
                "cut at {}: {}",
                cut,
                err
            );
        }
        // A cut past the budget's prefix does not matter to a device that never reads there.
        let loaded = state
            .load(Stored::Embedded(cut + 2), budget)
            .map(|a| a.view.rank());
        defmt::assert_eq!(loaded, Ok(rank));
    }

    #[test]
    fn a_flipped_byte_inside_the_prefix_is_damage(state: &mut State) {
        let budget = 256 << 10;
        let rank = state.rank_within(budget);
        defmt::assert!(rank >= 3);
        let len = state.reset_copy();
        // In slice k (rank k + 1), only ranks 1..=k stay intact.
        for k in [0, 1, rank - 1] {
            let at = state.prefix(k) + state.slice_len / 3;
            state.copy[at] ^= 0x04;
            let err = state.load(Stored::Copy(len), budget).err();
            state.copy[at] ^= 0x04;
            defmt::assert_eq!(
                err,
                Some(FirmwareError::BundleDamaged { rank, intact: k }),
                "flip in slice {}",
                k
            );
        }
        // In the header (alpha), the header checksum fails.
        state.copy[24] ^= 0x01;
        let err = state.load(Stored::Copy(len), budget).err();
        state.copy[24] ^= 0x01;
        defmt::assert!(
            matches!(
                err,
                Some(FirmwareError::Format(FormatFault(
                    FormatError::ChecksumMismatch { .. }
                )))
            ),
            "{}",
            err
        );
        // Past the prefix: never read, so never noticed.
        if rank < state.r_max {
            let at = state.prefix(rank) + 1;
            state.copy[at] ^= 0x04;
            let loaded = state.load(Stored::Copy(len), budget).map(|a| a.view.rank());
            state.copy[at] ^= 0x04;
            defmt::assert_eq!(loaded, Ok(rank));
        }
    }
}
