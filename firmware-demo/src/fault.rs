//! Panic and HardFault handlers: log one defmt error line, then end the run with a failure code.

use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, Ordering};

use cortex_m_rt::{ExceptionFrame, exception};

use crate::exit::{HARD_FAULT, PANIC, exit};

/// Set by the first handler that runs. A second failure while logging the first one (say, a
/// fault inside the logger, whose re-entry panics) exits at once instead of recursing.
static FAILING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    if !FAILING.swap(true, Ordering::SeqCst) {
        defmt::error!("panic: {}", defmt::Display2Format(info));
    }
    exit(PANIC)
}

/// `defmt::panic!` (and defmt's `assert!`, which defmt-test uses) has logged its message already.
#[defmt::panic_handler]
fn defmt_panic() -> ! {
    FAILING.store(true, Ordering::SeqCst);
    exit(PANIC)
}

#[allow(unsafe_code)] // cortex-m-rt requires HardFault to be an `unsafe fn`.
#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    if !FAILING.swap(true, Ordering::SeqCst) {
        defmt::error!(
            "HardFault: pc={=u32:#010x} lr={=u32:#010x} xpsr={=u32:#010x}",
            frame.pc(),
            frame.lr(),
            frame.xpsr()
        );
    }
    exit(HARD_FAULT)
}
