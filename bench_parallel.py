"""Costs on paper and across processes, for bench.py: FLOPs per token of a crosscoder step and of
harvesting, the 8 x H100 estimate (paper_estimate), and the data-parallel measurement

    python bench.py --nproc N [--shape toy|gemma] [--key value ...]

which times end-to-end training with fresh activations (every rank harvests its own sequences
into its own buffer and trains on its share of the global batch, gradients averaged) with 1
process and with N processes launched by torchrun on this machine, the CPU cores split evenly
between them (OMP threads per process = cores // processes), and prints tokens/s for each and
the speed-up, then the estimate.
"""
import json
import os
import subprocess
import sys
import tempfile

# On-paper assumptions for an 8 x H100 SXM node (stated in the README with the estimate).
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s
H100_FP32_PEAK = 67e12  # fp32 without TF32 (PyTorch's default for matmuls)
HARVEST_UTILISATION = 0.40  # bf16 forward passes of the two models
STEP_UTILISATION = 0.70  # the crosscoder step's matmuls (this CPU reaches 94% of its peak, bench --step_only)
NVLINK_BUS_BANDWIDTH = 360e9  # all-reduce bus bandwidth, B/s: NCCL tests report 460-480 on NVLink-4 at large sizes


def measure(cfg, shape, nprocs, cycles):
    """{n: (tokens/s, mean peak memory per process)} for each n in nprocs, one torchrun launch each."""
    cores = os.cpu_count() or 1
    results = {}
    for n in nprocs:
        with tempfile.TemporaryDirectory(prefix="bench_dp_") as tmp:
            spec_file, out = os.path.join(tmp, "spec.json"), os.path.join(tmp, "out.json")
            spec = {"cfg": dict(cfg, checkpoint_dir=tmp), "shape": shape, "cycles": cycles,
                    "threads": max(1, cores // n), "out": out}
            with open(spec_file, "w") as f:
                json.dump(spec, f)
            env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TQDM_DISABLE="1")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.py"), "--worker", spec_file]
            done = subprocess.run(cmd, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
            if done.returncode != 0:
                sys.exit(f"error: the {n}-process run failed (exit status {done.returncode})")
            with open(out) as f:
                r = json.load(f)
        results[n] = (r["tokens_per_s"], r["memory_per_process"])
        print(f"[bench] end to end, {n} process(es) x {spec['threads']} thread(s): {_rate(r['tokens_per_s'])} tokens/s",
              file=sys.stderr, flush=True)
    return results


def crosscoder_flops_per_token(cfg):
    """Matmul FLOPs of one training step per token: forward encode + decode 2·(2·M·D·F); backward
    2·M·D·F for the decoder input grad, the same for each weight grad, none for the input x."""
    return 10 * cfg["n_models"] * cfg["d_in"] * cfg["dict_size"]


def harvest_flops_per_token(c, n_layers, seq_len):
    """Matmul FLOPs per token of one model's forward through its first n_layers blocks (model
    config c), as TransformerLens runs them: the Q, K, V, O projections (K and V with grouped
    heads), the (gated) MLP, and attention scores and mixing over all seq_len positions (it
    computes the full square, then masks)."""
    n_kv = c.n_key_value_heads or c.n_heads
    projections = c.d_model * c.d_head * (2 * c.n_heads + 2 * n_kv)  # W_Q, W_O; W_K, W_V
    mlp = c.d_model * c.d_mlp * (3 if c.gated_mlp else 2)
    attention = 2 * c.n_heads * c.d_head * seq_len  # QK^T and pattern @ V
    return n_layers * 2 * (projections + mlp + attention)


def paper_estimate(n_gpus=8, batch_size=4096, d_in=2304, dict_size=2**14, n_models=2, step_dtype="fp32"):
    """Seconds per step of the Gemma-2-2b replication on 1 and n_gpus H100s, by arithmetic."""
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from config import layers_needed

    gemma = get_pretrained_model_config("gemma-2-2b")
    per_token = harvest_flops_per_token(gemma, layers_needed("blocks.14.hook_resid_pre"), seq_len=1024)
    harvest = batch_size * n_models * per_token / (H100_BF16_PEAK * HARVEST_UTILISATION)
    step_peak = H100_FP32_PEAK if step_dtype == "fp32" else H100_BF16_PEAK
    step = batch_size * crosscoder_flops_per_token(dict(n_models=n_models, d_in=d_in, dict_size=dict_size)) / (
        step_peak * STEP_UTILISATION)
    grad_bytes = 4 * 2 * n_models * d_in * dict_size  # fp32 gradients of W_enc and W_dec (biases: negligible)
    allreduce = grad_bytes * 2 * (n_gpus - 1) / n_gpus / NVLINK_BUS_BANDWIDTH  # a ring all-reduce
    return {"harvest": harvest, "step": step, "grad_bytes": grad_bytes, "allreduce": allreduce,
            "one": harvest + step, "many": (harvest + step) / n_gpus + allreduce}


def _rate(tokens_per_s):
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"  # CPU gemma: a few tokens/s


def report(header, results, nprocs):
    base = results[nprocs[0]][0]
    print("\n" + header)
    print(f"{'processes':<12} {'tokens/s':>10} {'speed-up':>10} {'peak RSS per process (GiB)':>28}")
    for n in nprocs:
        tps, mem = results[n]
        print(f"{n:<12} {_rate(tps):>10} {tps / base:>9.2f}x {mem:>28.2f}")
    print("\non paper, Gemma-2-2b on 8 H100 SXM (assumptions: bench_parallel.py's constants; 400M tokens, batch 4096):")
    for dtype in ("fp32", "bf16"):
        e = paper_estimate(step_dtype=dtype)
        steps = 400e6 / 4096
        print(f"  step_dtype {dtype}: per step, 1 GPU {e['one'] * 1e3:.1f} ms (harvest {e['harvest'] * 1e3:.1f} + step "
              f"{e['step'] * 1e3:.1f}); 8 GPUs {e['many'] * 1e3:.1f} ms, of which the all-reduce of "
              f"{e['grad_bytes'] / 1e6:.0f} MB of gradients {e['allreduce'] * 1e3:.1f} ms -> {e['one'] / e['many']:.1f}x; "
              f"400M tokens in {steps * e['one'] / 3600:.2f} h on 1 GPU, {steps * e['many'] / 3600:.2f} h on 8")
