//! Panics on purpose: scripts/firmware.sh checks that the panic handler logs a defmt error line
//! and ends the QEMU run with exit code 101 instead of hanging.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use qdylora_firmware_demo as _;

#[entry]
fn main() -> ! {
    // An index the compiler cannot see is out of bounds.
    let values = [1u8, 2, 3];
    let index = core::hint::black_box(values.len());
    defmt::info!("reading index {=usize} of {=usize}", index, values.len());
    let value = values[index];
    defmt::info!("unreachable: {=u8}", value);
    qdylora_firmware_demo::exit::exit(qdylora_firmware_demo::exit::SUCCESS)
}
