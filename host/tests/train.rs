//! The QDyLoRA trainer on the golden tiny LLaMA (NF4 at load): the frozen-mode update touches
//! only the sampled rank, resuming reproduces an uninterrupted run exactly, non-finite losses
//! stop the run, and the CLI reports bad input clearly.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use qdylora::demo::tokenizer;
use qdylora::model::load::{self, BaseLinears, LoadedModel, ModelSource};
use qdylora::train::data::{Dataset, Record, Template, TextCodec};
use qdylora::train::optim::{AdamWConfig, Schedule, ScheduleKind};
use qdylora::train::trainer::{AdapterDtype, RankMode, StepReport, TrainConfig, Trainer};
use qdylora_core::infer::LinearKind;
use qdylora_formats::bundle::BundleReader;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden")
}

fn model() -> (LoadedModel, [u8; 16]) {
    let source = ModelSource::open(&golden().join("base")).unwrap();
    let model = load::build(&source, BaseLinears::Nf4 { blocksize: 64 }, &Device::Cpu).unwrap();
    (model, load::base_fingerprint(&source, 64).unwrap())
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record::Instruction {
            instruction: "rev".into(),
            input: format!("{}", 10_000 + i * 37),
            output: format!("{}", 10_000 + i * 37).chars().rev().collect(),
        })
        .collect()
}

fn dataset() -> Dataset {
    let codec = TextCodec::new(tokenizer::build().unwrap()).unwrap();
    Dataset::build(&codec, &records(64), Template::Compact, 32, 0.1, 3).unwrap()
}

fn config(mode: RankMode, steps: u64) -> TrainConfig {
    TrainConfig {
        r_max: 8,
        alpha: 16.0,
        dropout: 0.1,
        targets: LinearKind::ALL.to_vec(),
        mode,
        steps,
        batch_size: 4,
        grad_accum: 2,
        schedule: Schedule {
            lr: 1e-2,
            warmup_steps: 2,
            total_steps: steps,
            kind: ScheduleKind::Cosine,
        },
        adamw: AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        },
        max_grad_norm: 1.0,
        seed: 11,
        adapter_dtype: AdapterDtype::F32,
    }
}

/// Every module's A and B, row by row.
type Snapshot = Vec<(Vec<Vec<f32>>, Vec<Vec<f32>>)>;

fn snapshot(t: &Trainer<'_>) -> Snapshot {
    t.adapter
        .modules
        .values()
        .map(|m| {
            (
                m.a.as_tensor().to_vec2().unwrap(),
                m.b.as_tensor().to_vec2().unwrap(),
            )
        })
        .collect()
}

#[test]
fn frozen_mode_moves_only_the_sampled_rank() {
    let (model, fp) = model();
    let data = dataset();
    let mut t = Trainer::new(&model.llama, config(RankMode::Frozen, 6), fp).unwrap();
    for _ in 0..6 {
        let before = snapshot(&t);
        let r = t.train_step(&data).unwrap();
        let k = r.rank - 1;
        let after = snapshot(&t);
        let mut changed = false;
        for ((a0, b0), (a1, b1)) in before.iter().zip(&after) {
            for row in 0..a0.len() {
                if row != k {
                    assert_eq!(
                        a0[row], a1[row],
                        "A row {row} moved at sampled rank {}",
                        r.rank
                    );
                }
            }
            for (r0, r1) in b0.iter().zip(b1) {
                for col in 0..r0.len() {
                    if col != k {
                        assert_eq!(
                            r0[col], r1[col],
                            "B column {col} moved at sampled rank {}",
                            r.rank
                        );
                    }
                }
                changed |= r0[k] != r1[k];
            }
            changed |= a0[k] != a1[k];
        }
        assert!(changed, "step at rank {} changed nothing", r.rank);
    }
}

#[test]
fn ranks_are_sampled_uniformly_per_step() {
    let (model, fp) = model();
    let t = Trainer::new(&model.llama, config(RankMode::Frozen, 1), fp).unwrap();
    let mut counts = [0usize; 8];
    for s in 0..8000 {
        counts[t.rank_for_step(s) - 1] += 1;
    }
    for c in counts {
        assert!((900..1100).contains(&c), "{counts:?}");
    }
    let fixed = Trainer::new(&model.llama, config(RankMode::Fixed(3), 1), fp).unwrap();
    assert!((0..50).all(|s| fixed.rank_for_step(s) == 3));
}

#[test]
fn resuming_reproduces_the_uninterrupted_losses() {
    let (model, fp) = model();
    let data = dataset();
    let dir = tempfile::tempdir().unwrap();
    for mode in [RankMode::Frozen, RankMode::Full, RankMode::Fixed(4)] {
        let cfg = config(mode, 8);
        let mut straight = Trainer::new(&model.llama, cfg.clone(), fp).unwrap();
        let all: Vec<StepReport> = (0..8)
            .map(|_| straight.train_step(&data).unwrap())
            .collect();

        let mut first = Trainer::new(&model.llama, cfg.clone(), fp).unwrap();
        for _ in 0..3 {
            first.train_step(&data).unwrap();
        }
        let ckpt = dir.path().join("ckpt.safetensors");
        first.save_checkpoint(&ckpt).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&model.llama, cfg.clone(), fp, &ckpt).unwrap();
        assert_eq!(resumed.step, 3);
        for want in &all[3..] {
            let got = resumed.train_step(&data).unwrap();
            assert_eq!((got.step, got.rank), (want.step, want.rank));
            assert_eq!(
                got.loss.to_bits(),
                want.loss.to_bits(),
                "{mode:?} step {}",
                want.step
            );
        }
        assert_eq!(snapshot(&resumed), snapshot(&straight));

        // A checkpoint only resumes the run that wrote it.
        let other = TrainConfig { seed: 12, ..cfg };
        assert!(Trainer::resume(&model.llama, other, fp, &ckpt).is_err());
        assert!(Trainer::resume(&model.llama, config(mode, 8), [0; 16], &ckpt).is_err());
    }
}

#[test]
fn a_non_finite_loss_stops_the_run() {
    let (model, fp) = model();
    let data = dataset();
    let mut cfg = config(RankMode::Fixed(2), 4);
    cfg.schedule.lr = 1e30;
    cfg.max_grad_norm = 0.0;
    let mut t = Trainer::new(&model.llama, cfg, fp).unwrap();
    let err = (0..4)
        .find_map(|_| t.train_step(&data).err())
        .expect("training must stop");
    assert!(err.to_string().contains("non-finite"), "{err}");
}

/// A bundle's layout (r_max, alpha, module names and shapes) and every value of its slices.
fn bundle_values(bytes: &[u8]) -> (String, Vec<f32>) {
    let reader = BundleReader::parse(bytes).unwrap();
    let mut layout = format!("r_max {} alpha {}", reader.r_max(), reader.alpha());
    let mut values = Vec::new();
    for i in 0..reader.module_count() {
        let m = reader.module(i).unwrap();
        layout += &format!("; {} {}x{}", m.name, m.out_features, m.in_features);
        for k in 0..reader.r_max() {
            values.extend(reader.a_row(i, k).unwrap().to_f32_vec());
            values.extend(reader.b_col(i, k).unwrap().to_f32_vec());
        }
    }
    (layout, values)
}

fn qdylora(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qdylora"))
        .args(args)
        .output()
        .unwrap()
}

/// A model folder: the golden base plus the demo tokenizer.
fn model_dir(root: &Path) -> PathBuf {
    let d = root.join("model");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(golden().join("base").join(f), d.join(f)).unwrap();
    }
    tokenizer::save(&tokenizer::build().unwrap(), &d).unwrap();
    d
}

fn write_data(path: &Path, records: &[Record]) {
    std::fs::write(path, qdylora::demo::task::to_jsonl(records)).unwrap();
}

#[test]
fn cli_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let m = model.to_str().unwrap();
    let data = dir.path().join("d.jsonl");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "--model",
            m,
            "--template",
            "compact",
            "--steps",
            "1",
            "--batch-size",
            "2",
        ];
        args.extend_from_slice(extra);
        let o = qdylora(&args);
        assert!(!o.status.success(), "{extra:?} succeeded");
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!e.contains("panicked"), "{e}");
        e
    };
    std::fs::write(&data, "{\"text\": \"ok\"}\n{\"text\": 3}\n").unwrap();
    let out = dir.path().join("o1");
    let e = run(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("d.jsonl:2"), "{e}");
    std::fs::write(&data, "\n\n").unwrap();
    let e = run(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(e.contains("no usable records"), "{e}");
    write_data(&data, &records(8));
    let e = run(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--r-max",
        "4000",
    ]);
    assert!(e.contains("r_max 4000 is larger"), "{e}");
    let e = run(&[
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--target-modules",
        "q_proj,lm_head",
    ]);
    assert!(e.contains("lm_head"), "{e}");

    // Sequences longer than the context are truncated with a warning, and training proceeds.
    let long = vec![Record::Text("x".repeat(400)); 4];
    write_data(&data, &long);
    let out = dir.path().join("o2");
    let o = qdylora(&[
        "train",
        "--model",
        m,
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--r-max",
        "2",
        "--max-seq-len",
        "16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
    assert!(out.join("adapter.qdyl").exists() && out.join("metrics.jsonl").exists());

    // `--recompute` (gradient checkpointing) trains the same adapter (no dropout: with dropout
    // the recomputed layers draw their masks from per-layer streams), to f32 rounding: its
    // written-out layer backward sums the same gradients in another order.
    let bundles: Vec<Vec<u8>> = [&[][..], &["--recompute"][..]]
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let out = dir.path().join(format!("recompute-{i}"));
            let mut args = vec![
                "train",
                "--model",
                m,
                "--data",
                data.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--r-max",
                "2",
                "--max-seq-len",
                "16",
                "--dropout",
                "0",
            ];
            args.extend_from_slice(extra);
            let o = qdylora(&args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            std::fs::read(out.join("adapter.qdyl")).unwrap()
        })
        .collect();
    let (plain, recomputed) = (bundle_values(&bundles[0]), bundle_values(&bundles[1]));
    assert_eq!(
        plain.0, recomputed.0,
        "--recompute changed the adapter's layout"
    );
    let largest = plain.1.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = plain
        .1
        .iter()
        .zip(&recomputed.1)
        .fold(0f32, |m, (p, r)| m.max((p - r).abs()));
    assert!(
        largest > 0.0 && diff <= 1e-5 * largest,
        "--recompute changed the trained adapter: {diff} (largest value {largest})"
    );

    // Export: a budget below rank 1 is reported, not fatal; an unparsable one is an error.
    let exp = dir.path().join("exp");
    let o = qdylora(&[
        "export",
        "--adapter",
        out.join("adapter.qdyl").to_str().unwrap(),
        "--model",
        m,
        "--out",
        exp.to_str().unwrap(),
        "--budget",
        "1KiB,1MiB",
        "--peft-ranks",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        stdout.contains("too small") && stdout.contains("rank 2"),
        "{stdout}"
    );
    assert!(exp.join("peft-r2/adapter_config.json").exists());
    let o = qdylora(&[
        "export",
        "--adapter",
        out.join("adapter.qdyl").to_str().unwrap(),
        "--model",
        m,
        "--out",
        exp.to_str().unwrap(),
        "--budget",
        "lots",
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("lots"));
}

/// Kills `qdylora train` at many moments, most of them during a checkpoint write (it saves
/// every step), and checks that the last good checkpoint always loads; then resumes to the end
/// and checks the metrics log holds every step exactly once.
#[test]
fn sigkill_during_a_save_never_corrupts_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_dir(dir.path());
    let data = dir.path().join("d.jsonl");
    write_data(&data, &records(64));
    let out = dir.path().join("run");
    let ckpt = out.join("checkpoint.safetensors");
    let steps = 120;
    let args = |resume: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--template",
            "compact",
            "--steps",
            &steps.to_string(),
            "--batch-size",
            "2",
            "--r-max",
            "8",
            "--checkpoint-every",
            "1",
            "--lr",
            "1e-3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let mut kills = 0;
    for i in 0..6u64 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qdylora"))
            .args(args(ckpt.exists()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Wait for this run to log a step of its own (so the kill is independent of how fast
        // the machine is), then kill after a short, varying delay inside the next step/save.
        let metrics = out.join("metrics.jsonl");
        let logged_lines = || {
            std::fs::read_to_string(&metrics)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        let before = logged_lines();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while logged_lines() <= before
            && child.try_wait().unwrap().is_none()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        std::thread::sleep(std::time::Duration::from_millis((i * 7) % 13));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        if ckpt.exists() {
            let bytes = std::fs::read(&ckpt).unwrap();
            safetensors::SafeTensors::deserialize(&bytes)
                .expect("checkpoint readable after SIGKILL");
        }
    }
    assert!(kills >= 4, "the run ended before it could be killed");
    assert!(ckpt.exists(), "no checkpoint was ever written");
    let o = qdylora(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let logged: Vec<u64> = log
        .lines()
        .map(|l| serde_json::from_str::<StepReport>(l).unwrap().step)
        .collect();
    // A kill can land between a step's log line and its checkpoint: resuming drops such lines.
    assert_eq!(logged, (1..=steps).collect::<Vec<u64>>());
}
