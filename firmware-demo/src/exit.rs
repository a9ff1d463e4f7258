//! How a firmware run ends: a semihosting exit, whose status QEMU returns to the shell.

/// All checks passed.
pub const SUCCESS: i32 = 0;
/// A typed error (bad input, a failed check) was logged.
pub const ERROR: i32 = 1;
/// A HardFault was logged.
pub const HARD_FAULT: i32 = 3;
/// A panic (a bug) was logged; the same code as a Rust program on a host.
pub const PANIC: i32 = 101;

/// Ends the QEMU run with `code` (SYS_EXIT_EXTENDED, so codes other than 0 and 1 survive).
pub fn exit(code: i32) -> ! {
    semihosting::process::exit(code)
}
