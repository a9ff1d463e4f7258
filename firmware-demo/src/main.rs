//! The QDyLoRA firmware for a Cortex-M4F (QEMU's mps2-an386).
//!
//! 1. The self-check ([`selfcheck`]): NF4 + double quant and the device matvec on a known matrix.
//! 2. The embedded device model is parsed in place (flash), and the adapter bundle's rank prefix
//!    that the build's RAM budget affords is copied into the adapter RAM ([`adapter::load`]).
//! 3. Greedy generation on the task prompts with that model and adapter ([`generate`]), logging
//!    tokens and logits for the host comparison in `scripts/firmware.sh`.
//!
//! Ends the QEMU run with exit code 0 when everything passed, 1 after logging a typed error.
#![no_std]
#![no_main]

use cortex_m_rt::entry;
use qdylora_firmware_demo::exit::{ERROR, SUCCESS, exit};
use qdylora_firmware_demo::selfcheck::{self, COLS, Quantized, ROWS, WEIGHT};
use qdylora_firmware_demo::{
    FirmwareError, adapter, adapter_ram, arena, assets, budget, generate, stack,
};
use qdylora_formats::device_model::DeviceModelReader;

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

    let model = DeviceModelReader::parse(assets::model_file())?;
    defmt::info!(
        "model: {=usize} bytes in flash, {}",
        assets::model_file().len(),
        model.config()
    );
    let stored = assets::bundle_file();
    let adapter = adapter::load(stored, adapter_ram, model.fingerprint())?;
    let reader = adapter.view.reader();
    defmt::info!(
        "adapter rank {=u32} of {=u32}: {=usize} bytes in RAM (budget {=usize} bytes, bundle {=usize} bytes)",
        adapter.view.rank(),
        reader.r_max(),
        adapter.bytes,
        budget::BYTES,
        stored.len()
    );

    let arena = arena::take().ok_or(FirmwareError::ArenaTaken)?;
    let needed = model.config().arena_len(arena::MAX_SEQ);
    let arena = arena
        .get_mut(..needed)
        .ok_or(FirmwareError::ArenaTooSmall {
            needed,
            capacity: arena::LEN,
        })?;
    for (index, prompt) in assets::PROMPTS.iter().enumerate() {
        generate::run_prompt(index, prompt, assets::EOS, &model, &adapter.view, arena)?;
    }
    defmt::info!("generated {=usize} prompts", assets::PROMPTS.len());
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
