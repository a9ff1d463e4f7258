//! The dequantized-bytes accounting, from the outside. The counters are process-wide, so this
//! binary has a single test: nothing else moves them while it runs.

use qdylora::kernels::{
    DequantScratch, MAX_TILE_BYTES, linear_backward_input, linear_forward, live_dequantized_bytes,
    peak_dequantized_bytes, reset_peak_dequantized_bytes,
};
use qdylora_formats::Nf4Weight;

#[test]
fn no_dequantized_weight_outlives_a_call() {
    assert_eq!(live_dequantized_bytes(), 0);
    {
        let scratch = DequantScratch::new(1000);
        assert_eq!(scratch.len(), 1000);
        assert_eq!(live_dequantized_bytes(), 4000);
        assert!(peak_dequantized_bytes() >= 4000);
    }
    assert_eq!(live_dequantized_bytes(), 0);
    reset_peak_dequantized_bytes();
    assert_eq!(peak_dequantized_bytes(), 0);

    // 2048 x 1000: 8 MB as f32, many tiles in both directions.
    let (rows, cols, m) = (2048, 1000, 8);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 201) as f32 - 100.0)
        .collect();
    let w = Nf4Weight::quantize(rows, cols, &data, 64).unwrap();
    let x = vec![0.5f32; m * cols];
    let mut y = vec![0.0f32; m * rows];
    linear_forward(&x, m, &w, &mut y).unwrap();
    assert_eq!(
        live_dequantized_bytes(),
        0,
        "forward left dequantized bytes alive"
    );
    let mut grad_x = vec![0.0f32; m * cols];
    linear_backward_input(&y, m, &w, &mut grad_x).unwrap();
    assert_eq!(
        live_dequantized_bytes(),
        0,
        "backward left dequantized bytes alive"
    );

    // The calls did dequantize, into at most one tile per thread at a time.
    let peak = peak_dequantized_bytes();
    let threads = rayon::current_num_threads();
    assert!(peak > 0);
    assert!(
        peak <= threads * MAX_TILE_BYTES,
        "peak {peak} bytes above {threads} tiles of {MAX_TILE_BYTES}"
    );
}
