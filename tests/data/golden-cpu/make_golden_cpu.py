"""Golden cases made on a CPU with the real peers (transformers, bitsandbytes' CPU backend, PEFT).

Each case is a tiny random LLaMA chosen to be awkward for a loader in a way the GPU-made set in
../golden is not (see CASES and README.md). For every case this writes, under OUT/<case>/:

  base/                    the model in HF format (bf16), saved by transformers
  bnb_nf4_dq/              that model loaded by transformers with bitsandbytes NF4 + double quant
                           (f32 compute) and saved with save_pretrained
  adapter/                 a PEFT LoRA adapter on all seven decoder linears (random non-zero A, B)
  input_ids.safetensors    int64 `input_ids` [B, T]
  ref_logits.safetensors   f32 [B, T, V]: base_f32, base_f32_plus_adapter,
                           bnb_nf4_dq_f32compute, bnb_nf4_dq_plus_adapter
  ref_logits.json          the shapes, and what the case exercises

Run from anywhere: `python3 make_golden_cpu.py` (OUT defaults to this script's folder).
Seeded and single-threaded, so a rerun with the same versions writes the same tensors.
"""
import json
import os
import shutil
import sys

import torch
import transformers
import peft
import bitsandbytes as bnb
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# What each case exercises is in its `why`; README.md repeats it.
CASES = [
    dict(
        name="untied_mqa_partial_blocks",
        why="untied lm_head; 3 query heads sharing 1 KV head (MQA); gate/up/down have 7200 "
            "elements, which leaves a 32-element partial NF4 block; rope_theta 500000 in the "
            "older form of config.json (top-level `rope_theta`, no `head_dim`); "
            "LoRA r 5, alpha 10",
        seed=11,
        config=dict(hidden_size=72, intermediate_size=100, num_hidden_layers=2,
                    num_attention_heads=3, num_key_value_heads=1, vocab_size=131,
                    max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=500000.0,
                    tie_word_embeddings=False),
        old_rope_form=True,
        lora=dict(r=5, lora_alpha=10, use_rslora=False),
        ids_shape=(2, 13),
    ),
    dict(
        name="wide_head_dim_mha_rslora",
        why="head_dim 40 with hidden 104 and 4 heads (heads*head_dim = 160 != hidden); "
            "num_key_value_heads == num_attention_heads; q/k/v/o have 260 NF4 blocks and "
            "gate/up/down 322 (20592 elements: a 48-element partial block), so each has a "
            "second, partial 256-block nested group; rope_theta 1e6 in rope_parameters; "
            "tied embeddings; rsLoRA r 12, alpha 6",
        seed=23,
        config=dict(hidden_size=104, intermediate_size=198, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, head_dim=40,
                    vocab_size=203, max_position_embeddings=64, rms_norm_eps=1e-5,
                    rope_theta=1e6, tie_word_embeddings=True),
        old_rope_form=False,
        lora=dict(r=12, lora_alpha=6, use_rslora=True),
        ids_shape=(3, 9),
    ),
]


def check_sizes(config):
    """Prints which decoder linears leave partial NF4 blocks (64) and nested groups (256 blocks)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    shapes = dict(q_proj=(q_out, hidden), k_proj=(kv_out, hidden), v_proj=(kv_out, hidden),
                  o_proj=(hidden, q_out), gate_proj=(inter, hidden), up_proj=(inter, hidden),
                  down_proj=(hidden, inter))
    partial = []
    for name, (out_f, in_f) in shapes.items():
        n = out_f * in_f
        blocks = -(-n // 64)
        print(f"  {name} [{out_f}, {in_f}]: {n} elements, {blocks} blocks "
              f"(last {n - (blocks - 1) * 64}), {-(-blocks // 256)} nested groups "
              f"(last {blocks - (-(-blocks // 256) - 1) * 256} blocks)")
        if n % 64:
            partial.append(name)
    return partial


def make_base(case, base_dir):
    torch.manual_seed(case["seed"])
    config = LlamaConfig(**case["config"])
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Non-trivial RMSNorm weights, so a loader that skips a norm is caught.
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(base_dir)
    if case["old_rope_form"]:
        # transformers 5 writes `rope_parameters` and `head_dim`; older files carry a top-level
        # `rope_theta` and leave head_dim to be hidden_size / num_attention_heads.
        path = os.path.join(base_dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        theta = cfg.pop("rope_parameters")["rope_theta"]
        cfg["rope_theta"] = theta
        assert cfg.pop("head_dim") * cfg["num_attention_heads"] == cfg["hidden_size"]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
    return config


def make_adapter(model, lora, ad_dir):
    lc = LoraConfig(target_modules=LINEARS, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                    init_lora_weights=False, **lora)
    pm = get_peft_model(model, lc)
    pm.save_pretrained(ad_dir)
    os.remove(os.path.join(ad_dir, "README.md"))  # PEFT's model-card template: not test data
    return pm


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float().contiguous()


def make_case(case, out):
    print(f"case {case['name']}")
    case_dir = os.path.join(out, case["name"])
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    # Relative paths, so the adapter records `base_model_name_or_path: "base"`, not this machine's.
    os.chdir(case_dir)
    base_dir, ad_dir = "base", "adapter"
    config = make_base(case, base_dir)
    assert check_sizes(config), "the case should leave a partial NF4 block somewhere"

    ids = torch.randint(0, config.vocab_size, case["ids_shape"], dtype=torch.int64)
    save_file({"input_ids": ids}, "input_ids.safetensors")

    ref = {}
    dense = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    want_theta = case["config"]["rope_theta"]
    assert dense.config.rope_parameters["rope_theta"] == want_theta, dense.config.rope_parameters
    assert dense.config.head_dim == config.head_dim
    ref["base_f32"] = logits(dense, ids)
    ref["base_f32_plus_adapter"] = logits(make_adapter(dense, case["lora"], ad_dir), ids)

    bq = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    quant = LlamaForCausalLM.from_pretrained(base_dir, quantization_config=bq, dtype=torch.float32,
                                             device_map={"": "cpu"})
    for m in quant.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks weights at the first forward and
            # rounds the absmax to bf16: keep the plain dequantize + f32 matmul path everywhere.
            m.support_avx512bf16_for_cpu = False
    ref["bnb_nf4_dq_f32compute"] = logits(quant, ids)
    quant.save_pretrained("bnb_nf4_dq")
    ref["bnb_nf4_dq_plus_adapter"] = logits(PeftModel.from_pretrained(quant, ad_dir), ids)

    save_file(ref, "ref_logits.safetensors")
    meta = dict(why=case["why"], seed=case["seed"],
                shapes={k: list(v.shape) for k, v in ref.items()})
    with open("ref_logits.json", "w") as f:
        json.dump(meta, f, indent=1)
        f.write("\n")
    base = ref["base_f32"]
    for k, v in ref.items():
        rel = ((v - base).norm() / base.norm()).item()
        print(f"  {k}: ‖ref − base_f32‖/‖base_f32‖ = {rel:.3e}")


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        # PEFT writes target_modules from a set: fix the hash seed so reruns write the same JSON.
        os.execve(sys.executable, [sys.executable] + sys.argv,
                  dict(os.environ, PYTHONHASHSEED="0"))
    out = os.path.abspath(os.environ.get("OUT", os.path.dirname(os.path.abspath(__file__))))
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, peft {peft.__version__}")
    for case in CASES:
        make_case(case, out)
    total = 0
    for root, _, files in os.walk(out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    print(f"total {total} bytes under {out}")


if __name__ == "__main__":
    main()
