"""Throughput benchmark: python -m tools.bench [--shape toy|gemma] [--device cpu|cuda]

On random-weight models (throughput does not depend on weight values), in one run: (a) harvest
tokens/s through both models, ours (stopped at the hook) and the reference's run_with_cache over
every layer and the unembedding, checking they give the same activations; (b) crosscoder steps
alone, fp32 and bf16 autocast, with their largest relative loss difference; (c) end-to-end
training over whole buffer refresh cycles (every trained row harvested inside the timed window),
ours, the reference's scheme with its refresh bug fixed and the reference as shipped (it harvests
only its first fill); (d) peak memory; (e) FLOP/s of (b) and (c) against a dense matmul measured
here; and training from an on-disk activation store (store.py). Each scheme runs alone in memory.

    python -m tools.bench --nproc N     (c) with 1 and N data-parallel processes (torchrun, the cores
                                  split between them), then crossdiff/scale/costs.py's 8 x H100 estimate
    python -m tools.bench --sweep N     (c) for one crosscoder and for a sweep of N on one harvest
"""
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from buffer import ActivationStore
from crossdiff.config.cli import format_help, parse_overrides
from crossdiff.config.plan import buffer_sequences, layers_needed, sequences_needed, steps_per_refresh
from crossdiff.config.schema import DEFAULTS, ConfigError
from crossdiff.pairs.toy import toy_model_cfg
from crossdiff.scale import distributed
from crossdiff.scale.costs import crosscoder_flops_per_token, paper_estimate
from crossdiff.scale.process import keep_freed_memory
from crossdiff.sources import activations
from crossdiff.sources.activations import autocast_context, extract_activations
from crossdiff.sources.models import drop_unembedding
from crossdiff.sources.store import harvest
from sweep import Sweep
from trainer import Trainer

REPO = Path(__file__).resolve().parents[1]  # tools/ -> the repository: scripts run from there

SHAPES = {  # hook, d_in, dict_size, seq_len, batch_size, model_batch_size, buffer_mult
    "toy": dict(hook_point="blocks.2.hook_resid_pre", d_in=64, dict_size=1024, seq_len=32, batch_size=512,
                model_batch_size=256, buffer_mult=16),
    "gemma": dict(hook_point="blocks.14.hook_resid_pre", d_in=2304, dict_size=2**14, seq_len=1024,
                  batch_size=4096, model_batch_size=4, buffer_mult=128),
}


# ---------------------------------------------------------------- across processes
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
                   "-m", "tools.bench", "--worker", spec_file]
            done = subprocess.run(cmd, env=env, cwd=REPO)
            if done.returncode != 0:
                sys.exit(f"error: the {n}-process run failed (exit status {done.returncode})")
            with open(out) as f:
                r = json.load(f)
        results[n] = (r["tokens_per_s"], r["memory_per_process"])
        print(f"[bench] end to end, {n} process(es) x {spec['threads']} thread(s): {_rate(r['tokens_per_s'])} tokens/s",
              file=sys.stderr, flush=True)
    return results


def _rate(tokens_per_s):
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 100 else f"{tokens_per_s:.3g}"  # CPU gemma: a few tokens/s


def report(header, results, nprocs):
    base = results[nprocs[0]][0]
    print("\n" + header)
    print(f"{'processes':<12} {'tokens/s':>10} {'speed-up':>10} {'peak RSS per process (GiB)':>28}")
    for n in nprocs:
        tps, mem = results[n]
        print(f"{n:<12} {_rate(tps):>10} {tps / base:>9.2f}x {mem:>28.2f}")
    print("\non paper, Gemma-2-2b on 8 H100 SXM (assumptions: crossdiff/scale/costs.py's constants; 400M tokens, batch 4096):")
    for dtype in ("fp32", "bf16"):
        e = paper_estimate(step_dtype=dtype)
        steps = 400e6 / 4096
        print(f"  step_dtype {dtype}: per step, 1 GPU {e['one'] * 1e3:.1f} ms (harvest {e['harvest'] * 1e3:.1f} + step "
              f"{e['step'] * 1e3:.1f}); 8 GPUs {e['many'] * 1e3:.1f} ms, of which the all-reduce of "
              f"{e['grad_bytes'] / 1e6:.0f} MB of gradients {e['allreduce'] * 1e3:.1f} ms -> {e['one'] / e['many']:.1f}x; "
              f"400M tokens in {steps * e['one'] / 3600:.2f} h on 1 GPU, {steps * e['many'] / 3600:.2f} h on 8")


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


def matmul_peak(device, dtype, sizes=None, repeat=5, max_s=2.0):
    """The best dense square matmul rate over a few sizes and repeats, FLOP/s (the best single
    run: on a shared machine a mean would understate the peak and flatter the fractions). A GPU
    reaches its peak only at larger sizes; 8192 on CPU would cost half a minute per repeat. A size
    whose one matmul would take over max_s at the rate so far is skipped: a CPU without native bf16
    (AVX2 only) multiplies bf16 ~100x slower than fp32, and 4096 would take minutes."""
    best = 0.0
    for n in sizes or ((2048, 4096, 8192) if torch.device(device).type == "cuda" else (512, 2048, 4096)):
        if best and 2 * n**3 / best > max_s:
            break
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeat):
            t, _ = timed(lambda: a @ b, device, repeat=1)  # timed() warms up again: cheap at these sizes
            best = max(best, 2 * n**3 / t)
    return best


def build_model(shape, device, n_layers=None):
    """A random-weight model of the shape; n_layers < full keeps only the first layers (what
    first_n_layers loads). The seed is fixed, so the kept layers equal the full model's."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    if shape == "toy":
        cfg = toy_model_cfg(0).to_dict()
    else:
        cfg = get_pretrained_model_config("gemma-2-2b", device=device).to_dict()
    # no tokenizer: the benchmark feeds token ids, and loading one would need the hub
    # init_weights: the pretrained config leaves the weights uninitialised (they are loaded)
    cfg.update(device=device, seed=0, n_layers=n_layers or cfg["n_layers"], tokenizer_name=None, init_weights=True)
    return HookedTransformer(HookedTransformerConfig.from_dict(cfg)).eval()


def model_and_tokens(shape, device, cfg, seed=0):
    """A random-weight model cut at the hook, as training loads one, and 4096 random sequences."""
    model = build_model(shape, device, layers_needed(cfg["hook_point"]))
    drop_unembedding(model)
    data = torch.randint(1, model.cfg.d_vocab, (4096, cfg["seq_len"]), generator=torch.Generator().manual_seed(seed))
    data[:, 0] = 2  # BOS
    return model, data


def worker(spec_file):
    """`tools/bench.py --worker SPEC`, one rank under torchrun (measure): a random-weight model of
    the shape, end_to_end on this rank's share."""
    spec = json.loads(open(spec_file).read())
    torch.set_num_threads(spec["threads"])
    device = distributed.setup(spec["cfg"]["device"]) if distributed.launched() else spec["cfg"]["device"]
    cfg = dict(spec["cfg"], device=device)
    if device == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    model, data = model_and_tokens(spec["shape"], device, cfg)
    tokens_per_s = end_to_end(cfg, model, data, spec["cycles"], device)
    memory = torch.tensor([peak_memory(device)], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    distributed.average_([memory])
    if distributed.is_main():
        with open(spec["out"], "w") as f:
            json.dump({"tokens_per_s": tokens_per_s, "memory_per_process": float(memory)}, f)
    distributed.teardown()
    if distributed.launched():
        distributed.exit_process(0)


def peak_memory(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process high-water mark


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def end_to_end(cfg, model, data, cycles, device, shipped=False, sweep=0):
    """Tokens/s over whole refresh cycles after one warm-up cycle. Each cycle harvests half the
    buffer and trains on as many rows, so the time includes harvesting every trained row.
    shipped=True times the reference as it shipped: after its first fill each refresh slices no
    tokens (it compared an index with a count), so it runs the models on empty batches, harvests
    nothing and reshuffles the same rows. sweep=N: N crosscoders (l1_coeff 1..N) trained on one
    harvest (sweep.py); tokens/s counts each batch once, as each member sees it."""
    if sweep:
        trainer = Sweep(dict(cfg), {"l1_coeff": [float(i + 1) for i in range(sweep)]}, models=[model, model],
                        tokens=data)
        buf = trainer.source
    else:
        trainer = Trainer(dict(cfg), model, model, data)  # the initial fill is not timed
        buf = trainer.buffer
    # under torchrun each rank's buffer (its share of the batch) refreshes on its own schedule
    batch, per_cycle = cfg["batch_size"], steps_per_refresh(buf.cfg)
    refresh = buf.refresh
    if shipped:
        def shipped_refresh():
            empty = data[:0].to(device)
            for _ in range(0, buf.buffer_batches // 2, cfg["model_batch_size"]):
                with torch.no_grad(), autocast_context(device):
                    [activations.extract_activations(model, empty, cfg["hook_point"]) for _ in range(2)]
            buf.buffer = buf.buffer[torch.randperm(buf.buffer_size, generator=buf.generator).to(device)]
            buf.pointer = 0

        refresh = buf.refresh = shipped_refresh
    for _ in range(per_cycle):
        trainer.step()
    refreshes = [0]

    def counted():
        refreshes[0] += 1
        refresh()

    buf.refresh = counted
    sync(device)
    distributed.barrier()
    t0 = time.perf_counter()
    for _ in range(per_cycle * cycles):
        trainer.step()
    sync(device)
    distributed.barrier()
    elapsed = time.perf_counter() - t0
    assert refreshes[0] == cycles, f"timed {refreshes[0]} refreshes, expected {cycles}"
    return batch * per_cycle * cycles / elapsed


def main():
    # none: the shape's value (a small CPU gemma run overrides them)
    options = {"device": "cuda" if torch.cuda.is_available() else "cpu", "architecture": "l1", "k": 100,
               **{k: None for k in ("seq_len", "model_batch_size", "batch_size", "buffer_mult", "dict_size", "d_in")}}
    flags = {"shape": "toy (default) or gemma", "steps": "crosscoder steps timed in (b)",
             "cycles": "buffer refresh cycles timed in (c)", "step_only": "only the matmul peak and (b): no models",
             "fp32_only": "(b) in fp32 only (a CPU without bf16 units runs a bf16 BatchTopK step for minutes)",
             "nproc": "N: only (c), ours, with 1 and with N data-parallel processes (torchrun)",
             "sweep": "N: only (c), ours, one crosscoder against a sweep of N on one harvest (sweep.py)"}
    numbers = ("steps", "cycles", "nproc", "sweep")
    try:
        given, extras = parse_overrides(sys.argv[1:], options, flags=("shape", *numbers), switches=("step_only", "fp32_only"))
        if set(given) != set(options):
            raise ConfigError(f"bench.py takes only the config keys {sorted(options)}, not {sorted(set(given) - set(options))}")
        options, shape_name = given, extras.get("shape", "toy")
        if shape_name not in SHAPES:
            raise ConfigError(f"--shape must be one of {list(SHAPES)}, got {shape_name!r}")
        steps, cycles, nproc, sweep = (int(extras[k]) if k in extras else None for k in numbers)
        if options["d_in"] is not None and not extras.get("step_only"):
            raise ConfigError("--d_in sets the width of (b)'s steps alone (with --step_only): the models fix it otherwise")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    except ValueError as e:
        sys.exit(f"error: --steps, --cycles, --nproc and --sweep take integers ({e})")
    if extras.get("help"):
        print(format_help("usage: python -m tools.bench [--shape toy|gemma] [--device cpu|cuda] [--key value ...]",
                          options, flags))
        sys.exit(0)
    warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")  # TL 3.9, on every model
    device, toy = options["device"], shape_name == "toy"
    if device == "cpu":
        keep_freed_memory()  # as train.py does
    shape = dict(SHAPES[shape_name], **{k: v for k, v in options.items() if k != "device" and v is not None})
    steps = steps or (200 if toy else 10)
    cycles = cycles or (20 if toy else 2)
    cfg = dict(DEFAULTS, **shape, device=device, num_tokens=shape["batch_size"] * 10**6, lr=1e-4,
               norm_estimate_batches=2, wandb_mode="disabled", progress=False, log_every=10**9,
               save_every=10**9, checkpoint_dir=tempfile.mkdtemp(prefix="bench_ckpt_"), wrap_tokens=True)
    S, mbs, hook, batch = cfg["seq_len"], cfg["model_batch_size"], cfg["hook_point"], cfg["batch_size"]
    torch.manual_seed(0)
    rows, flops = [], crosscoder_flops_per_token(cfg)

    def add(name, tokens_per_s, memory=None):
        rows.append((name, tokens_per_s, memory))
        print(f"[bench] {name}: {tokens_per_s:,.3g} tokens/s", file=sys.stderr, flush=True)  # long gemma runs

    if nproc:
        nprocs = [1, nproc]
        results = measure(cfg, shape_name, nprocs, cycles)
        return report(f"bench --shape {shape_name} --device {device} --nproc {nproc}: end to end, ours, "
                                     f"d_in {cfg['d_in']}, dict {cfg['dict_size']}, batch {batch}, seq_len {S}, "
                                     f"{cycles} refresh cycles", results, nprocs)
    if sweep:
        return sweep_report(cfg, shape_name, device, sweep, cycles)
    # (e) the device's dense matmul peak, fp32 and bf16
    peak = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}

    # (b) crosscoder step alone, fp32 (the reference) and bf16 autocast
    x = torch.randn(batch, cfg["n_models"], cfg["d_in"], device=device)
    step_tps, step_logs = {}, {}
    dtypes = ("fp32",) if extras.get("fp32_only") else ("fp32", "bf16")
    for dtype in dtypes:
        trainer = Trainer(dict(cfg, step_dtype=dtype), buffer=type("Fixed", (), {"next": lambda self: x})())
        t, _ = timed(lambda: [trainer.step() for _ in range(steps)], device)
        step_tps[dtype] = batch * steps / t
        step_logs[dtype] = trainer.step()  # the same weights history in both: compare the losses
        add(f"crosscoder step, {dtype}", step_tps[dtype])
        del trainer
    if cfg["architecture"] == "batchtopk":  # the sparse step (crossdiff/arch/sparse.py) against the dense one, fp32
        trainer = Trainer(dict(cfg, sparse_step=True), buffer=type("Fixed", (), {"next": lambda self: x})())
        t, _ = timed(lambda: [trainer.step() for _ in range(steps)], device)
        step_tps["sparse"] = batch * steps / t
        add("crosscoder step, fp32, sparse", step_tps["sparse"])
        del trainer

    summary = [f"dense matmul peak measured here: fp32 {peak['fp32'] / 1e9:,.1f}, bf16 {peak['bf16'] / 1e9:,.1f} GFLOP/s"]
    for dtype in dtypes:
        rate = step_tps[dtype] * flops
        summary.append(f"crosscoder step, {dtype}: {rate / 1e9:,.1f} GFLOP/s = {rate / peak[dtype]:.0%} of the {dtype} peak")
    if "bf16" in step_logs:
        loss_gap = max(abs(float(step_logs["bf16"][k]) / float(step_logs["fp32"][k]) - 1)
                       for k in ("l2_loss", "l1_loss", "explained_variance"))
        summary.append(f"bf16 autocast vs fp32 after {2 * steps + 1} steps: largest relative loss difference {loss_gap:.1e}")
    if "sparse" in step_tps:
        summary.append(f"sparse/dense BatchTopK step speed-up: {step_tps['sparse'] / step_tps['fp32']:.2f}x")
    header = (f"bench --shape {shape_name} --device {device}: {cfg['architecture']}"
              + (f" k {cfg['k']}" if cfg["architecture"] == "batchtopk" else "")
              + f", d_in {cfg['d_in']}, dict {cfg['dict_size']}, batch {batch}, (b) {steps} steps")
    if extras.get("step_only"):
        shutil.rmtree(cfg["checkpoint_dir"], ignore_errors=True)
        return print_report(header, rows, summary, device)

    acts, harvest_t, e2e = {}, {}, {}
    n_cut = layers_needed(hook)
    for name, n_layers, extract in (("ours", n_cut, extract_activations), ("reference", None, reference_extract)):
        reset_peak_memory(device)
        if name == "ours":  # cut at the hook, as load_gemma_pair loads it for training
            model, data = model_and_tokens(shape_name, device, cfg)
            tokens = data[:mbs].to(device)
        else:
            model = build_model(shape_name, device, n_layers)
        # (a) harvest through both models (the same weights twice: the cost is what matters)
        with torch.no_grad(), autocast_context(device):
            harvest_t[name], out = timed(lambda: [extract(model, tokens, hook) for _ in range(2)], device,
                                         3 if toy else 2)
        acts[name] = out[0].float().cpu()
        add(f"harvest, {name}", mbs * (S - 1) / harvest_t[name])
        # (c) end to end: the buffer runs the models through activations.extract_activations
        calls = [0]

        def counted_extract(*args):
            calls[0] += 1
            return extract(*args)

        activations.extract_activations = counted_extract
        try:
            e2e[name] = end_to_end(cfg, model, data, cycles, device)
            add(f"end to end, {name}" + (" (refresh bug fixed)" if name == "reference" else ""), e2e[name],
                peak_memory(device))
            if name == "reference":
                e2e["shipped"] = end_to_end(cfg, model, data, cycles, device, shipped=True)
                add("end to end, reference as shipped", e2e["shipped"], peak_memory(device))
        finally:
            activations.extract_activations = extract_activations
        assert calls[0] > 0, f"the {name} scheme's extraction was never called end to end"
        if name == "ours":  # training from a store harvested once (untimed) by the same model
            store_dir = tempfile.mkdtemp(prefix="bench_store_")
            harvest(dict(cfg), [model, model], data, store_dir, sequences_needed(cfg, 2 * steps + 2))
            for prefetch in (False, True):  # side by side: the refresh's reads inside it, or read ahead
                source = ActivationStore(dict(cfg, store_prefetch=prefetch), store_dir)
                waited, serve = [0.0], source.next

                def waiting_next():  # the time the step waits for its batch (refreshes included)
                    start = time.perf_counter()
                    out = serve()
                    sync(device)
                    waited[0] += time.perf_counter() - start
                    return out

                source.next = waiting_next
                trainer = Trainer(dict(cfg, store_prefetch=prefetch), buffer=source)
                t, _ = timed(lambda: [trainer.step() for _ in range(steps)], device)
                add(f"training from the activation store ({'read ahead' if prefetch else 'read in each refresh'}; "
                    f"{waited[0] / t:.0%} of it waiting for data)", batch * steps / t)
                del trainer, source
            shutil.rmtree(store_dir, ignore_errors=True)
        model = None
        gc.collect()  # free this scheme's model before the next is built
    shutil.rmtree(cfg["checkpoint_dir"], ignore_errors=True)
    same = (torch.allclose(acts["ours"], acts["reference"], atol=1e-3, rtol=1e-3)
            and bool(torch.isfinite(acts["ours"]).all()) and acts["ours"].abs().max() > 0)  # real weights

    header += (f", seq_len {S}, model_batch_size {mbs}, buffer_mult {cfg['buffer_mult']}, (c) {cycles} refresh "
               f"cycles; ours loads {n_cut} layers; activations equal: {same}")
    summary = [f"harvest speed-up, ours / reference: {harvest_t['reference'] / harvest_t['ours']:.2f}x",
               f"end-to-end speed-up, ours / reference with its refresh bug fixed: {e2e['ours'] / e2e['reference']:.2f}x",
               f"end-to-end, ours / reference as shipped: {e2e['ours'] / e2e['shipped']:.2f}x (as shipped it harvests its "
               f"first fill only and trains on those {buffer_sequences(cfg) * (S - 1):,} rows however long it runs)"] + summary + [
        f"end to end, ours (crosscoder FLOPs only): {e2e['ours'] * flops / peak['fp32']:.0%} of the fp32 peak",
        f"projected time for 400M tokens at ours: {400e6 / e2e['ours'] / 3600:,.1f} h "
        f"(reference with its refresh bug fixed: {400e6 / e2e['reference'] / 3600:,.1f} h)"]
    print_report(header, rows, summary, device)


def sweep_report(cfg, shape_name, device, n, cycles):
    """(c) for ours: one crosscoder, then a sweep of n on one harvest, each after its own warm-up
    cycle; the speed-up over n separate runs is n x (sweep tokens/s) / (one run's tokens/s)."""
    model, data = model_and_tokens(shape_name, device, cfg)
    rows = []
    for members in (0, n):
        reset_peak_memory(device)
        rate = end_to_end(cfg, model, data, cycles, device, sweep=members)
        rows.append((f"end to end, {'one crosscoder' if not members else f'sweep of {members} (each)'}", rate,
                     peak_memory(device)))
        print(f"[bench] {rows[-1][0]}: {rate:,.3g} tokens/s", file=sys.stderr, flush=True)
        gc.collect()
    shutil.rmtree(cfg["checkpoint_dir"], ignore_errors=True)
    one, each = rows[0][1], rows[1][1]
    print_report(f"bench --shape {shape_name} --device {device} --sweep {n}: end to end, ours, d_in {cfg['d_in']}, "
                 f"dict {cfg['dict_size']}, batch {cfg['batch_size']}, seq_len {cfg['seq_len']}, {cycles} refresh cycles",
                 rows, [f"{n} crosscoders on 1M tokens each: one sweep {1e6 / each:,.4g} s, {n} separate runs "
                        f"{n * 1e6 / one:,.4g} s: the sweep is {n * each / one:.2f}x faster"], device)


def print_report(header, rows, summary, device):
    mem = "peak GPU memory allocated" if device.startswith("cuda") else "peak process RSS so far"
    print("\n" + header)
    print(f"{'measure':<42} {'tokens/s':>12} {mem + ' (GiB)':>32}")
    for name, v, m in rows:
        print(f"{name:<42} {_rate(v):>12} {'' if m is None else f'{m:.2f}':>32}")
    print("\n".join(summary))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
