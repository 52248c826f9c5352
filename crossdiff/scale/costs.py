"""What a run costs, on paper: the bytes one rank holds at the peak of a training step (each
architecture's STEP_PHASES: the sweep checks that its members fit, the README's memory table),
the FLOPs per token of the harvest and of the crosscoder step, and the seconds per step of the
Gemma-2-2b replication on one and on 8 H100s (tools/bench.py prints these beside what it measures).
Tests check each formula against torch's own counters (MemTracker, FlopCounterMode).
"""
from crossdiff.config.plan import layers_needed


# ---------------------------------------------------------------- memory
def held_bytes(d_in, dict_size, shards=1, n_models=2):
    """Bytes one rank holds throughout training in fp32: its shard's weights, gradients and Adam
    moments (4 copies of W_enc, W_dec, b_enc; b_dec replicated)."""
    f = dict_size // shards
    return 4 * 4 * (2 * n_models * d_in * f + f + n_models * d_in)


def memory_per_rank(d_in, dict_size, step_phases, shards=1, rows=4096, n_models=2):
    """Bytes one rank holds at the peak of a training step in fp32: held_bytes, plus the step's
    temporaries for `rows` rows (the latent group's batch: batch_size / data-parallel groups): the
    architecture's STEP_PHASES, and [rows, M, D] copies (inputs, reconstruction, error; sharded:
    the gathered rows and the summed reconstruction). step_phases: the architecture class's
    STEP_PHASES, ((per row, per decoder) fp32 tensors of the step's latents, ...). Measured with torch's MemTracker on CPU steps
    at shapes from rows << M * D to rows >> M * D (tests/test_costs.py checks it)."""
    f = dict_size // shards
    step = max(per_row * rows * f + per_decoder * n_models * d_in * f
               for per_row, per_decoder in step_phases)
    row_copies = 2 + 2 * (shards > 1)
    return held_bytes(d_in, dict_size, shards, n_models) + 4 * (step + row_copies * rows * n_models * d_in)


def memory_table(step_phases, gpu_bytes=80e9, rows=4096):
    """The README's table: GB per rank, d_in 2304 and 3584, dict 2^14 ... 2^20, 1-8 shards."""
    lines = ["| d_in | dict_size | 1 shard | 2 shards | 4 shards | 8 shards |", "| --- | --- | --- | --- | --- | --- |"]
    for d_in in (2304, 3584):
        for log2 in range(14, 21):
            cells = []
            for shards in (1, 2, 4, 8):
                b = memory_per_rank(d_in, 2**log2, step_phases, shards, rows)
                cells.append(f"{b / 1e9:.1f}" + ("" if b <= gpu_bytes else " (no)"))
            lines.append(f"| {d_in} | 2^{log2} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- FLOPs and time
# On-paper assumptions for an 8 x H100 SXM node (stated in the README with the estimate).
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s
H100_FP32_PEAK = 67e12  # fp32 without TF32 (PyTorch's default for matmuls)
HARVEST_UTILISATION = 0.40  # bf16 forward passes of the two models
STEP_UTILISATION = 0.70  # the crosscoder step's matmuls (this CPU reaches 94% of its peak, bench --step_only)
NVLINK_BUS_BANDWIDTH = 360e9  # all-reduce bus bandwidth, B/s: NCCL tests report 460-480 on NVLink-4 at large sizes


def crosscoder_flops_per_token(cfg):
    """Matmul FLOPs of one training step per token: forward encode + decode 2·(2·M·D·F); backward
    2·M·D·F for the decoder input grad, the same for each weight grad, none for the input x."""
    return 10 * cfg["n_models"] * cfg["d_in"] * cfg["dict_size"]


def sparse_step_flops_per_token(cfg):
    """The same for BatchTopK's sparse step (arch/sparse.py): the dense encoder forward 2·M·D·F, then
    per kept latent 2·M·D each for the decode, the decoder's gradient, the values' gradient and
    the encoder's weight gradient (AuxK, when latents are dead, adds its own kept entries)."""
    M, D = cfg["n_models"], cfg["d_in"]
    return 2 * M * D * cfg["dict_size"] + 8 * M * D * cfg["k"]


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
