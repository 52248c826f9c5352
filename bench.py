"""Throughput benchmark: python bench.py [--shape toy|gemma] [--device cpu|cuda]

Measures in one run, on random-weight models (throughput does not depend on weight values):
 (a) harvest: token positions per second through both models, ours (stop at the hook) and the
     reference's scheme (run_with_cache over every layer and the unembedding), with a check that
     both give the same activations;
 (b) crosscoder training steps alone (a fixed batch, no harvesting);
 (c) end-to-end training with fresh activations (Buffer refreshes included), ours and reference;
 (d) peak memory; (e) achieved FLOP/s of (b) and (c) against a dense matmul measured here;
 and training from an on-disk activation store (store.py) against live harvesting.
"""
import argparse
import resource
import time

import torch

import buffer as buffer_module
from buffer import extract_activations, hook_layer
from trainer import Trainer


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeat=1):
    fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat, out


def reference_extract(model, tokens, hook_point):
    """The reference's extraction: the full forward, logits included, caching one hook."""
    _, cache = model.run_with_cache(tokens, names_filter=hook_point)
    return cache[hook_point]


def matmul_peak(device, dtype, n=2048, repeat=5):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t, _ = timed(lambda: a @ b, device, repeat)
    return 2 * n**3 / t


def build_models(shape, device, layers_needed):
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    if shape == "toy":
        from toy import toy_model_cfg

        cfg = toy_model_cfg(0)
        hook, d_in, dict_size, seq_len, batch, mbs = "blocks.2.hook_resid_pre", 64, 1024, 32, 512, 256
    else:
        cfg = get_pretrained_model_config("gemma-2-2b", device=device)
        hook, d_in, dict_size, seq_len, batch, mbs = "blocks.14.hook_resid_pre", 2304, 2**14, 1024, 4096, 4
    cfg.device = device
    full = HookedTransformer(cfg).eval()
    cut_cfg = cfg.to_dict()
    cut_cfg["n_layers"] = layers_needed(hook)  # what first_n_layers loads for our scheme
    from transformer_lens import HookedTransformerConfig

    cut = HookedTransformer(HookedTransformerConfig.from_dict(cut_cfg)).eval()
    cut.load_state_dict({k: v for k, v in full.state_dict().items() if k in cut.state_dict()}, strict=False)
    return full, cut, dict(hook_point=hook, d_in=d_in, dict_size=dict_size, seq_len=seq_len,
                           batch_size=batch, model_batch_size=mbs)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=["toy", "gemma"], default="toy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="training steps to time (default by shape)")
    p.add_argument("--seq_len", type=int, default=None, help="override the shape's seq_len (a CPU gemma run)")
    p.add_argument("--model_batch_size", type=int, default=None)
    args = p.parse_args()
    device = args.device
    torch.manual_seed(0)
    full, cut, shape = build_models(args.shape, device, lambda hook: hook_layer(hook) + 1)
    if args.seq_len:
        shape["seq_len"] = args.seq_len
    if args.model_batch_size:
        shape["model_batch_size"] = args.model_batch_size
    steps = args.steps or (200 if args.shape == "toy" else 20)
    from train import default_cfg

    cfg = dict(default_cfg, **shape, device=device, num_tokens=shape["batch_size"] * steps, lr=1e-4,
               buffer_mult=16 if args.shape == "toy" else 32, norm_estimate_batches=2, wandb_mode="disabled",
               progress=False, log_every=10**9, save_every=10**9, checkpoint_dir="/tmp/bench_checkpoints",
               wrap_tokens=True)
    S, mbs, hook = cfg["seq_len"], cfg["model_batch_size"], cfg["hook_point"]
    tokens = torch.randint(1, full.cfg.d_vocab, (mbs * 8, S), device=device)
    tokens[:, 0] = 2
    rows = []

    # (a) harvest, both models (the same weights twice: the cost is what matters)
    with torch.no_grad(), buffer_module.autocast_context(device):
        t_ours, a = timed(lambda: [extract_activations(cut, tokens[:mbs], hook) for _ in range(2)], device, 3)
        t_ref, b = timed(lambda: [reference_extract(full, tokens[:mbs], hook) for _ in range(2)], device, 3)
    same = torch.allclose(a[0].float(), b[0].float(), atol=1e-3, rtol=1e-3)
    harvest = mbs * (S - 1)
    rows += [("harvest, ours (stop at hook)", harvest / t_ours), ("harvest, reference (run_with_cache)", harvest / t_ref)]

    # (b) crosscoder step alone
    class Fixed:
        x = torch.randn(cfg["batch_size"], 2, cfg["d_in"], device=device)

        def next(self):
            return self.x

    trainer = Trainer(dict(cfg), buffer=Fixed())
    t_step, _ = timed(lambda: [trainer.step() for _ in range(steps)], device)
    step_tps = cfg["batch_size"] * steps / t_step
    rows.append(("crosscoder step", step_tps))
    peak = matmul_peak(device, torch.float32 if device == "cpu" else torch.bfloat16)
    flops_per_token = 12 * 2 * cfg["d_in"] * cfg["dict_size"]  # fwd 4·M·D·F, bwd 2x, M = 2

    # (c) end to end with fresh activations, ours and the reference's extraction
    data = torch.randint(1, full.cfg.d_vocab, (4096, S))
    data[:, 0] = 2
    e2e = {}
    for name, model, extract in (("ours", cut, extract_activations), ("reference", full, reference_extract)):
        buffer_module.extract_activations = extract
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
        tr = Trainer(dict(cfg), model, model, data)
        t, _ = timed(lambda: [tr.step() for _ in range(steps)], device)
        e2e[name] = (cfg["batch_size"] * steps / t,
                     torch.cuda.max_memory_allocated() / 2**30 if device != "cpu" else None)
        rows.append((f"end to end, {name}", e2e[name][0]))
        del tr
    buffer_module.extract_activations = extract_activations

    # training from an on-disk activation store (harvested once, untimed) vs live harvesting
    import tempfile

    from buffer import sequences_needed
    from store import ActivationStore, harvest

    store_dir = tempfile.mkdtemp(prefix="bench_store_")
    harvest(dict(cfg), [cut, cut], data, store_dir, sequences_needed(cfg, 2 * steps + 2))
    tr = Trainer(dict(cfg), buffer=ActivationStore(dict(cfg), store_dir))
    t, _ = timed(lambda: [tr.step() for _ in range(steps)], device)
    rows.append(("training from the activation store", cfg["batch_size"] * steps / t))
    import shutil

    shutil.rmtree(store_dir, ignore_errors=True)

    print(f"\nbench --shape {args.shape} --device {device}: d_in {cfg['d_in']}, dict {cfg['dict_size']}, batch "
          f"{cfg['batch_size']}, seq_len {S}, model_batch_size {mbs}, {steps} steps; activations equal: {same}")
    print(f"{'measure':<38} {'tokens/s':>12}")
    for name, v in rows:
        print(f"{name:<38} {v:>12,.0f}")
    print(f"harvest speed-up, ours / reference: {t_ref / t_ours:.2f}x")
    print(f"end-to-end speed-up, ours / reference: {e2e['ours'][0] / e2e['reference'][0]:.2f}x")
    print(f"dense matmul peak measured here: {peak / 1e9:,.1f} GFLOP/s")
    print(f"crosscoder step: {step_tps * flops_per_token / 1e9:,.1f} GFLOP/s = {step_tps * flops_per_token / peak:.0%} of peak")
    print(f"end to end (crosscoder FLOPs only): {e2e['ours'][0] * flops_per_token / peak:.0%} of peak")
    if device == "cpu":
        print(f"peak process memory (RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    else:
        print(f"peak GPU memory: ours {e2e['ours'][1]:.1f} GiB, reference {e2e['reference'][1]:.1f} GiB")
        print(f"projected time for 400M tokens at ours: {400e6 / e2e['ours'][0] / 3600:.1f} h")


if __name__ == "__main__":
    main()
