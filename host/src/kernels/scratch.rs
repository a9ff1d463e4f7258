//! Accounting for dequantized weights: every scratch buffer that holds dequantized values is a
//! [`DequantScratch`], whose bytes are counted while it lives. The frozen linears promise that no
//! dequantized weight outlives a call; these counters let a test prove it.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static PEAK_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of dequantized weights alive right now, across all threads.
pub fn live_dequantized_bytes() -> usize {
    LIVE_BYTES.load(Ordering::SeqCst)
}

/// The most bytes of dequantized weights that were alive at once since the last reset.
pub fn peak_dequantized_bytes() -> usize {
    PEAK_BYTES.load(Ordering::SeqCst)
}

/// Restarts the peak from what is alive now. The counters are process-wide: a test that asserts
/// on them must not run beside other tests that dequantize.
pub fn reset_peak_dequantized_bytes() {
    PEAK_BYTES.store(LIVE_BYTES.load(Ordering::SeqCst), Ordering::SeqCst);
}

/// A zeroed f32 buffer for dequantized weights, counted in [`live_dequantized_bytes`] until it
/// is dropped.
#[derive(Debug)]
pub struct DequantScratch {
    values: Vec<f32>,
}

impl DequantScratch {
    /// A buffer of `len` zeros.
    pub fn new(len: usize) -> Self {
        let values = vec![0.0f32; len];
        let bytes = Self::bytes_of(&values);
        let live = LIVE_BYTES.fetch_add(bytes, Ordering::SeqCst) + bytes;
        PEAK_BYTES.fetch_max(live, Ordering::SeqCst);
        Self { values }
    }

    fn bytes_of(values: &Vec<f32>) -> usize {
        values.capacity() * size_of::<f32>()
    }
}

impl Drop for DequantScratch {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(Self::bytes_of(&self.values), Ordering::SeqCst);
    }
}

impl Deref for DequantScratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.values
    }
}

impl DerefMut for DequantScratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }
}
