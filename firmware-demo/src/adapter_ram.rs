//! The static RAM buffer for the adapter's rank prefix: [`budget::BYTES`] bytes in `.bss`, handed
//! out once. Static rather than on the stack so the linker, not a run, finds out that a preset
//! does not fit the board's RAM, and so the size report shows each preset's real cost.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::budget;

/// 8-byte aligned: the file readers view f32 / f16 arrays of the prefix in place.
#[repr(C, align(8))]
struct Buffer([u8; budget::BYTES]);

static mut BUFFER: Buffer = Buffer([0; budget::BYTES]);
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The buffer, on the first call only (`None` afterwards).
pub fn take() -> Option<&'static mut [u8]> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return None;
    }
    // SAFETY: TAKEN lets this line run at most once, so this is the only reference to BUFFER
    // that ever exists.
    #[allow(unsafe_code)]
    let buffer = unsafe { &mut *core::ptr::addr_of_mut!(BUFFER) };
    Some(&mut buffer.0)
}
