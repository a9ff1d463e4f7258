//! `qdylora quantize` and `qdylora logits` as a user runs them, against files written by
//! transformers, bitsandbytes and PEFT (tests/data/golden), and their error paths.

mod common;
use common::relative_error;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qdylora_formats::bundle::{BundleMeta, ModuleTensors, write_bundle};
use qdylora_formats::peft;
use safetensors::SafeTensors;

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden")
}

fn qdylora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qdylora"))
        .args(args)
        .output()
        .expect("run qdylora")
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn reference(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(golden().join("ref_logits.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    f32s(st.tensor(name).unwrap().data())
}

fn logits_file(p: &Path) -> Vec<f32> {
    let bytes = std::fs::read(p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), [3, 11, 257]);
    f32s(t.data())
}

#[test]
fn quantize_writes_what_transformers_and_bitsandbytes_write() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nf4");
    let o = qdylora(&[
        "quantize",
        "--model",
        path(&golden().join("base")),
        "--out",
        path(&out),
        "--dtype",
        "float32",
        "--compute-dtype",
        "float32",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = std::fs::read(out.join("model.safetensors")).unwrap();
    let theirs = std::fs::read(golden().join("bnb_nf4_dq/model.safetensors")).unwrap();
    let (ours, theirs) = (
        SafeTensors::deserialize(&ours).unwrap(),
        SafeTensors::deserialize(&theirs).unwrap(),
    );
    let mut quantized = 0;
    for (name, t) in theirs.tensors() {
        let o = ours
            .tensor(&name)
            .unwrap_or_else(|_| panic!("missing {name}"));
        assert_eq!((o.dtype(), o.shape()), (t.dtype(), t.shape()), "{name}");
        if t.dtype() == safetensors::Dtype::U8
            || name.contains("absmax")
            || name.contains("quant_map")
        {
            assert_eq!(o.data(), t.data(), "{name} differs");
            quantized += 1;
        }
    }
    assert_eq!(ours.len(), theirs.len());
    // 21 linears, six tensors each.
    assert_eq!(quantized, 21 * 6);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden().join("bnb_nf4_dq/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["quantization_config"], want["quantization_config"]);
}

#[test]
fn logits_match_peft_on_the_bitsandbytes_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("logits.safetensors");
    let o = qdylora(&[
        "logits",
        "--model",
        path(&golden().join("bnb_nf4_dq")),
        "--adapter",
        path(&golden().join("adapter_r8")),
        "--input-ids",
        path(&golden().join("input_ids.safetensors")),
        "--out",
        path(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let err = relative_error(&logits_file(&out), &reference("bnb_nf4_dq_plus_adapter"));
    assert!(err < 1e-4, "relative error {err:e}");
}

/// The PEFT adapter rewritten as a nested bundle for the golden base.
fn bundle_from_peft(fingerprint: [u8; 16]) -> Vec<u8> {
    let a = peft::read_adapter(&golden().join("adapter_r8")).unwrap();
    let modules: Vec<ModuleTensors> = a
        .modules
        .iter()
        .map(|(name, p)| ModuleTensors {
            name: name.clone(),
            in_features: p.in_features as u32,
            out_features: p.out_features as u32,
            a: p.a.clone(),
            b: p.b.clone(),
        })
        .collect();
    let meta = BundleMeta {
        r_max: 8,
        alpha: 16.0,
        dtype: qdylora_core::ElementType::F32,
        scaling: qdylora_core::rank::Scaling::AlphaOverRank,
        fingerprint,
    };
    write_bundle(&meta, &modules).unwrap()
}

fn golden_fingerprint() -> [u8; 16] {
    let source = qdylora::model::load::ModelSource::open(&golden().join("bnb_nf4_dq")).unwrap();
    qdylora::model::load::base_fingerprint(&source, 64).unwrap()
}

#[test]
fn logits_with_a_bundle_at_full_rank_equal_peft_and_lower_ranks_differ() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("adapter.qdyl");
    std::fs::write(&bundle, bundle_from_peft(golden_fingerprint())).unwrap();
    let run = |model: &str, rank: &str, out: &Path| {
        let o = qdylora(&[
            "logits",
            "--model",
            path(&golden().join(model)),
            "--adapter",
            path(&bundle),
            "--rank",
            rank,
            "--input-ids",
            path(&golden().join("input_ids.safetensors")),
            "--out",
            path(out),
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        logits_file(out)
    };
    let full = run("bnb_nf4_dq", "8", &dir.path().join("r8.safetensors"));
    assert!(relative_error(&full, &reference("bnb_nf4_dq_plus_adapter")) < 1e-4);
    // The HF checkpoint has the same fingerprint (quantized bit-exactly at load).
    let hf = run("base", "8", &dir.path().join("hf.safetensors"));
    assert!(relative_error(&hf, &reference("base_f32_plus_adapter")) < 1e-4);
    let r4 = run("bnb_nf4_dq", "4", &dir.path().join("r4.safetensors"));
    assert!(relative_error(&r4, &full) > 1e-3);
    assert!(relative_error(&r4, &reference("bnb_nf4_dq_f32compute")) > 1e-3);
}

/// Runs a command that must fail: non-zero exit, an `error:` line mentioning `needle`, and no
/// output file left behind.
fn expect_failure(args: &[&str], out: &Path, needle: &str) {
    let o = qdylora(args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(
        stderr.contains("error:") && stderr.contains(needle),
        "{args:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists(), "{args:?} left {}", out.display());
}

#[test]
fn bad_inputs_get_clear_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let ids = golden().join("input_ids.safetensors");
    let bnb = golden().join("bnb_nf4_dq");
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["logits", "--input-ids", path(&ids), "--out", path(&out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |extra: &[&str], needle: &str| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        expect_failure(&refs, &out, needle);
    };
    check(&["--model", "/nonexistent/model"], "does not exist");
    check(
        &[
            "--model",
            path(&bnb),
            "--adapter",
            path(&golden().join("adapter_r8")),
            "--rank",
            "0",
        ],
        "rank 0",
    );
    check(
        &[
            "--model",
            path(&bnb),
            "--adapter",
            path(&golden().join("adapter_r8")),
            "--rank",
            "9",
        ],
        "rank 9",
    );
    let bundle = dir.path().join("a.qdyl");
    std::fs::write(&bundle, bundle_from_peft(golden_fingerprint())).unwrap();
    check(
        &["--model", path(&bnb), "--adapter", path(&bundle)],
        "--rank is required",
    );
    let wrong = dir.path().join("wrong.qdyl");
    std::fs::write(&wrong, bundle_from_peft([7; 16])).unwrap();
    check(
        &[
            "--model",
            path(&bnb),
            "--adapter",
            path(&wrong),
            "--rank",
            "2",
        ],
        "another base model",
    );
    let mut cut = bundle_from_peft(golden_fingerprint());
    cut.truncate(40);
    let cut_path = dir.path().join("cut.qdyl");
    std::fs::write(&cut_path, cut).unwrap();
    check(
        &[
            "--model",
            path(&bnb),
            "--adapter",
            path(&cut_path),
            "--rank",
            "1",
        ],
        "bundle",
    );

    // A model whose weights hold a NaN, and one of another architecture.
    let copy = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(golden().join("base").join(f), d.join(f)).unwrap();
        }
        edit(&d);
        d
    };
    let nan = copy("nan", &|d| {
        let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        let n = bytes.len();
        // The last tensor's last bf16 value becomes NaN (0x7fc0).
        bytes[n - 2..].copy_from_slice(&0x7fc0u16.to_le_bytes());
        std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    });
    check(&["--model", path(&nan)], "finite");
    let arch = copy("arch", &|d| {
        let mut c: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        c["model_type"] = "gpt2".into();
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        std::fs::write(d.join("config.json"), serde_json::to_vec(&c).unwrap()).unwrap();
    });
    check(&["--model", path(&arch)], "gpt2");

    // quantize refuses an existing output folder and leaves nothing half-written on failure.
    let existing = dir.path().join("exists");
    std::fs::create_dir_all(&existing).unwrap();
    let o = qdylora(&[
        "quantize",
        "--model",
        path(&golden().join("base")),
        "--out",
        path(&existing),
    ]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already exists"));
    let failed = dir.path().join("never");
    let o = qdylora(&["quantize", "--model", path(&nan), "--out", path(&failed)]);
    assert!(!o.status.success());
    assert!(!failed.exists());
}

#[test]
fn every_command_has_help() {
    for cmd in [
        "quantize",
        "logits",
        "train",
        "sweep",
        "export",
        "demo",
        "demo-base",
        "gpu-dequant",
    ] {
        let o = qdylora(&[cmd, "--help"]);
        assert!(o.status.success(), "{cmd} --help");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{cmd}"
        );
    }
}

/// The demo end to end at a tiny size: every step runs, prints its table and budgets, and
/// leaves the files the README and the firmware assets script rely on.
#[test]
fn demo_runs_end_to_end_at_a_tiny_size() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = qdylora(&[
        "demo",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--qdylora-steps",
        "4",
        "--r-max",
        "4",
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for expected in [
        "QLoRA r=4 truncated",
        "QLoRA trained at rank",
        "budget     64KiB: rank 3",
        "budget    256KiB: rank 4",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    // r_max 4 makes the small-rank baseline 4 the same as the r_max one: trained once.
    assert_eq!(stdout.matches("qlora-r4:").count(), 1, "{stdout}");
    for file in [
        "export/adapter.qdyl",
        "export/model.qdm",
        "export/peft-r4/adapter_config.json",
        "data/eval.jsonl",
        "sweep.svg",
        "sweep-qdylora.csv",
    ] {
        assert!(out.join(file).exists(), "{file}");
    }
    let o = qdylora(&["demo", "--out", out.to_str().unwrap(), "--r-max", "0"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--r-max"));
}

/// The default build has no GPU path: the GPU command says how to get one instead of failing
/// obscurely.
#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_command_without_the_cuda_feature_says_how_to_build_it() {
    let o = qdylora(&["gpu-dequant", "--rows", "64", "--cols", "64"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("bench/build-cuda.sh"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn bench_json(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "train-bench",
        "--json",
        "--seq",
        "32",
        "--r-max",
        "4",
        "--warmup",
        "1",
        "--steps",
        "2",
    ];
    args.extend_from_slice(extra);
    let o = qdylora(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("one JSON object")
}

/// The training benchmark runs on the CPU (the GPU runs the same code with bf16 activations):
/// it reports what it timed, and recomputing activations changes the cost, not the result.
#[test]
fn train_bench_reports_throughput_and_recomputation_keeps_the_loss() {
    let with = bench_json(&[]);
    let without = bench_json(&["--no-recompute"]);
    assert_eq!(with["recompute"], true);
    assert_eq!(without["recompute"], false);
    assert_eq!(with["layers"], 2);
    assert_eq!(with["ranks"].as_array().unwrap().len(), 2);
    assert!(
        with["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| (1..=4).contains(&r.as_u64().unwrap()))
    );
    assert!(with["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(with["peak_gib"].is_null(), "no peak memory on the CPU");
    let (a, b) = (
        with["loss"].as_f64().unwrap(),
        without["loss"].as_f64().unwrap(),
    );
    assert!(a.is_finite() && a > 0.0);
    assert!(
        (a - b).abs() <= 1e-6 * a,
        "loss {a} with recomputation, {b} without"
    );

    // The CPU-reference check runs the same steps again: on the CPU it must agree exactly.
    let checked = bench_json(&["--check-against-cpu"]);
    assert_eq!(checked["max_loss_rel_diff"], 0.0);
    assert_eq!(checked["losses"], checked["cpu_losses"]);
    assert_eq!(checked["losses"].as_array().unwrap().len(), 3);

    // One more step is measured phase by phase: the recomputing trainer's phases in order,
    // and the plain one's forward and backward as one.
    let phase_names = |report: &serde_json::Value| -> Vec<String> {
        let phases = report["phases"].as_array().expect("a list of phases");
        for p in phases {
            let s = p["seconds"].as_f64().unwrap();
            assert!(s.is_finite() && s >= 0.0, "{p}");
        }
        phases
            .iter()
            .map(|p| p["phase"].as_str().unwrap().to_string())
            .collect()
    };
    let recomputing = [
        "forward",
        "head and loss",
        "layers backward",
        "gradient accumulation",
        "gradient norm",
        "optimizer",
    ];
    assert_eq!(phase_names(&with)[..6], recomputing);
    let plain = [
        "forward and backward",
        "gradient accumulation",
        "gradient norm",
        "optimizer",
    ];
    assert_eq!(phase_names(&without)[..4], plain);
    assert!(with["phase_step_rank"].as_u64().is_some());

    // And one more inside the layers: the written-out layers' categories (in any order), the
    // rest last; autograd's layers run only the NF4 linears among them.
    let detail = |report: &serde_json::Value| -> Vec<String> {
        let names: Vec<String> = report["detail"]
            .as_array()
            .expect("a list of categories")
            .iter()
            .map(|p| p["phase"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(
            names.last().map(String::as_str),
            Some("the rest of the forward and backward passes")
        );
        names
    };
    let mut categories = detail(&with);
    categories.sort();
    assert_eq!(
        categories,
        [
            "LoRA path",
            "NF4 linears (CPU: dequantization in the product)",
            "attention core (QKᵀ, softmax, PV)",
            "the rest of the forward and backward passes",
        ]
    );
    assert_eq!(
        detail(&without),
        [
            "NF4 linears (CPU: dequantization in the product)",
            "the rest of the forward and backward passes",
        ]
    );

    let o = qdylora(&["train-bench", "--layers", "3"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--layers must be 1..=2"));
}

/// Switching a fused op off (for the before/after measurement) trains the same model: the
/// losses agree to f32 rounding, and the report says which ops ran.
#[test]
fn train_bench_unfused_ops_give_the_same_losses() {
    let ops = [
        "softmax",
        "swiglu",
        "rms_norm",
        "rope",
        "cross_entropy",
        "lora_scale",
    ];
    let fused = bench_json(&[]);
    for op in ops {
        assert_eq!(fused["fusions"][op], true, "{op}");
    }
    for off in [
        "softmax",
        "swiglu",
        "rms-norm",
        "rope",
        "cross-entropy",
        "lora-scale",
        "all",
    ] {
        let unfused = bench_json(&["--unfuse", off]);
        for op in ops {
            let on = off != "all" && off.replace('-', "_") != op;
            assert_eq!(unfused["fusions"][op], on, "--unfuse {off}: {op}");
        }
        let pairs = fused["losses"]
            .as_array()
            .unwrap()
            .iter()
            .zip(unfused["losses"].as_array().unwrap());
        for (a, b) in pairs {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            assert!(
                (a - b).abs() <= 1e-5 * a,
                "--unfuse {off}: loss {b}, fused {a}"
            );
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn train_bench_on_cuda_without_the_feature_says_how_to_build_it() {
    let o = qdylora(&["train-bench", "--device", "cuda"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bench/build-cuda.sh"), "{err}");
}
