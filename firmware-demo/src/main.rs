//! The QDyLoRA firmware for a Cortex-M4F (QEMU's mps2-an386).
//!
//! Phase 1 reserves the adapter RAM of the build's budget preset and runs the self-check
//! ([`selfcheck`]). Phase 2 adds, in `run`: read the bundle header, pick the largest rank whose
//! prefix fits the adapter RAM, copy that prefix there, and run the model on the task prompts.
//!
//! Ends the QEMU run with exit code 0 when everything passed, 1 after logging a typed error.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use qdylora_firmware_demo::exit::{ERROR, SUCCESS, exit};
use qdylora_firmware_demo::selfcheck::{self, COLS, Quantized, ROWS, WEIGHT};
use qdylora_firmware_demo::{FirmwareError, adapter_ram, budget, stack};

#[entry]
fn main() -> ! {
    stack::paint();
    defmt::info!(
        "qdylora firmware-demo, adapter budget {=str} ({=usize} bytes)",
        budget::NAME,
        budget::BYTES
    );
    match run() {
        Ok(()) => {
            defmt::info!("stack peak: {=usize} bytes", stack::peak_bytes());
            exit(SUCCESS)
        }
        Err(err) => {
            defmt::error!("firmware failed: {}", err);
            exit(ERROR)
        }
    }
}

fn run() -> Result<(), FirmwareError> {
    let adapter_ram = adapter_ram::take().ok_or(FirmwareError::AdapterRamTaken)?;
    defmt::info!(
        "adapter RAM: {=usize} bytes at {=usize:#010x}",
        adapter_ram.len(),
        adapter_ram.as_ptr() as usize
    );

    let quantized = Quantized::new(&WEIGHT)?;
    defmt::info!(
        "self-check: NF4 + double-quant matvec {=usize}x{=usize}",
        ROWS,
        COLS
    );
    let report = selfcheck::run(packed_input(&quantized), &quantized)?;
    defmt::info!("self-check passed: {}", report);
    Ok(())
}

/// The packed codes the self-check reads. With the `damaged-input` feature they lose their last
/// byte, as a cut-short file would, which the core must reject with a typed error.
fn packed_input(quantized: &Quantized) -> &[u8] {
    let packed = &quantized.packed[..];
    if cfg!(feature = "damaged-input") {
        &packed[..packed.len() - 1]
    } else {
        packed
    }
}
