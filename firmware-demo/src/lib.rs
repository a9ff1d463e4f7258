//! Support code for the QDyLoRA Cortex-M4F firmware, shared by the main binary, the examples and
//! the on-target tests (`tests/`, defmt-test in QEMU).
//!
//! Linking this crate brings in the defmt logger (semihosting), the critical-section
//! implementation, and panic and HardFault handlers that log and end the QEMU run with a
//! failure code ([`exit`]), so a run never hangs.
#![no_std]
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod adapter;
pub mod adapter_ram;
pub mod arena;
pub mod assets;
pub mod budget;
mod error;
pub mod exit;
mod fault;
mod fault_injection;
pub mod generate;
pub mod selfcheck;
pub mod stack;
pub mod synthetic;

pub use error::{FirmwareError, FormatFault};

// The critical-section implementation (feature `critical-section-single-core`) and the defmt
// global logger are found by the linker only if these crates are linked.
use cortex_m as _;
use defmt_semihosting as _;
