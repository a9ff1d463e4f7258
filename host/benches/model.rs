//! One training step's forward + backward of the demo's small LLaMA on the CPU (NF4 + double
//! quant base, a rank-16 adapter on all seven linears), reported as tokens per second.
//!
//! `cargo bench -p qdylora --bench model -- --warm-up-time 1 --measurement-time 10`

use std::hint::black_box;

use candle_core::{Device, Tensor};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qdylora::demo::default_base_dir;
use qdylora::model::load::{self, BaseLinears, ModelSource};
use qdylora::model::lora::{AdapterCall, RankGrad};
use qdylora::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use qdylora::train::trainer::{AdapterDtype, RankMode, TrainConfig, Trainer};
use qdylora_core::infer::LinearKind;

fn forward_backward(c: &mut Criterion) {
    let device = Device::Cpu;
    let source = ModelSource::open(&default_base_dir()).expect("host/assets/demo-base");
    let model = load::build(&source, BaseLinears::Nf4 { blocksize: 64 }, &device).unwrap();
    let config = TrainConfig {
        r_max: 16,
        alpha: 16.0,
        dropout: 0.0,
        targets: LinearKind::ALL.to_vec(),
        mode: RankMode::Frozen,
        steps: 1,
        batch_size: 1,
        grad_accum: 1,
        schedule: Schedule {
            lr: 1e-3,
            warmup_steps: 0,
            total_steps: 1,
            kind: ScheduleKind::Constant,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: 0.0,
        seed: 0,
        adapter_dtype: AdapterDtype::F32,
    };
    let trainer = Trainer::new(&model.llama, config, [0; 16]).unwrap();
    let mut group = c.benchmark_group("forward_backward_demo_llama");
    for (batch, seq) in [(16usize, 16usize), (64, 16)] {
        let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7 % 42) as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, seq), &device).unwrap();
        group.throughput(Throughput::Elements((batch * seq) as u64));
        group.bench_function(format!("b{batch}xt{seq}_rank16"), |b| {
            b.iter(|| {
                let call = AdapterCall {
                    adapter: &trainer.adapter,
                    rank: 16,
                    grad: RankGrad::All,
                    dropout: None,
                };
                let logits = model.llama.forward(&ids, Some(&call)).unwrap();
                let loss = logits.sqr().unwrap().mean_all().unwrap();
                black_box(loss.backward().unwrap());
            })
        });
    }
    group.finish();
}

criterion_group!(benches, forward_backward);
criterion_main!(benches);
