//! The NF4 base keeps no dequantized weight alive: not between forward and backward, not after.
//! (This file holds one test: the live-bytes gauge is process-wide.)

use std::path::Path;

use candle_core::{Device, Tensor};
use qdylora::kernels::{
    live_dequantized_bytes, peak_dequantized_bytes, reset_peak_dequantized_bytes,
};
use qdylora::model::load::{self, BaseLinears, ModelSource};
use qdylora::model::lora::{AdapterCall, RankGrad};

#[test]
fn no_dequantized_weight_outlives_forward_or_backward() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden");
    let device = Device::Cpu;
    let source = ModelSource::open(&golden.join("bnb_nf4_dq")).unwrap();
    let model = load::build(&source, BaseLinears::Dense, &device).unwrap();
    let cfg = source.config().to_decoder_config();
    let adapter = load::adapter_from_peft(&golden.join("adapter_r8"), &cfg, &device).unwrap();
    let call = AdapterCall {
        adapter: &adapter,
        rank: 8,
        grad: RankGrad::All,
        dropout: None,
    };
    let ids = Tensor::from_vec(
        (0..2 * 9).map(|i| (i * 7 % 257) as u32).collect::<Vec<_>>(),
        (2, 9),
        &device,
    )
    .unwrap();

    reset_peak_dequantized_bytes();
    let logits = model.llama.forward(&ids, Some(&call)).unwrap();
    // The forward dequantized tiles (the gauge saw them) and released every one of them, while
    // the graph that backward needs is still alive.
    assert!(peak_dequantized_bytes() > 0);
    assert_eq!(live_dequantized_bytes(), 0);

    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(live_dequantized_bytes(), 0);
    // Backward went through the NF4 linears (the adapter's A got a gradient).
    let (_, first) = adapter.modules.iter().next().unwrap();
    let g = grads.get(first.a.as_tensor()).expect("gradient for A");
    assert!(
        g.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    // What stays resident is the packed weight: far below an f32 copy of the linears.
    let linear_params: usize = (0..cfg.num_layers)
        .flat_map(|_| {
            qdylora_core::infer::LinearKind::ALL.map(|k| {
                let s = k.shape(&cfg);
                (s.in_features * s.out_features) as usize
            })
        })
        .sum();
    let nf4_bytes: usize = model
        .llama
        .layers
        .iter()
        .flat_map(|l| l.linears.iter())
        .map(|l| l.resident_bytes())
        .sum();
    assert!(
        nf4_bytes * 4 < linear_params * 4,
        "{nf4_bytes} resident vs {} f32",
        linear_params * 4
    );
}
