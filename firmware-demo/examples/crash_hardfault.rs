//! Faults on purpose: scripts/firmware.sh checks that the HardFault handler logs a defmt error
//! line and ends the QEMU run with exit code 3 instead of hanging.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use qdylora_firmware_demo as _;

#[entry]
fn main() -> ! {
    defmt::info!("executing a permanently undefined instruction");
    // UsageFault is not enabled at reset, so it escalates to HardFault.
    cortex_m::asm::udf()
}
