//! The bytes that move between the trainer, the devices and the tools users already have.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
mod nf4_weight;
#[cfg(feature = "std")]
pub use nf4_weight::Nf4Weight;
