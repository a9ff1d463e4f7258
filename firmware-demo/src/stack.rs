//! Peak stack use, measured by painting: [`paint`] fills the free stack with a pattern at start,
//! and [`peak_bytes`] finds the deepest word that no longer holds it. The size report covers the
//! statics; this covers the rest of the working memory.
//!
//! Painting writes below the stack pointer, which is sound only while nothing else can push
//! there: call [`paint`] first thing in `main`, with no interrupts enabled (this firmware enables
//! none, and its only fault handler ends the run).
#![allow(unsafe_code)]

use core::ptr::{addr_of, read_volatile, write_volatile};

const PAINT: u32 = 0x5afe_57ac;
/// Left unpainted below the current stack pointer, for `paint`'s own frame.
const MARGIN: usize = 256;

unsafe extern "C" {
    // cortex-m-rt's link.x: the stack runs from `_stack_start` (the top of RAM) down to
    // `_stack_end` (the end of the statics).
    static _stack_start: u32;
    static _stack_end: u32;
}

fn bounds() -> (usize, usize) {
    // Only the symbols' addresses mean anything; their values are never read.
    (
        addr_of!(_stack_end) as usize,
        addr_of!(_stack_start) as usize,
    )
}

/// Fills the stack below the current frame with the pattern.
pub fn paint() {
    let (bottom, _) = bounds();
    let limit = (cortex_m::register::msp::read() as usize).saturating_sub(MARGIN);
    for addr in (bottom..limit).step_by(4) {
        // SAFETY: [bottom, limit) is word-aligned RAM between the statics and the live stack,
        // which nothing else uses (see the module notes).
        unsafe { write_volatile(addr as *mut u32, PAINT) };
    }
}

/// Bytes of stack used at the deepest point since [`paint`].
pub fn peak_bytes() -> usize {
    let (bottom, top) = bounds();
    let deepest = (bottom..top)
        .step_by(4)
        // SAFETY: the whole stack region is readable, word-aligned RAM.
        .find(|&addr| unsafe { read_volatile(addr as *const u32) } != PAINT)
        .unwrap_or(top);
    top - deepest
}
