"""The first thing to run on a machine with a GPU: one command (a few minutes on one GPU), one
table, one JSON file.

    python -m tools.gpu_check [--device cuda] [--out gpu_check.json] [--shape gemma|tiny]

(a) the crosscoder step at the Gemma shape (d_in 2304, dict 2^14, batch 4096; BatchTopK k 100)
    for each step_dtype (fp32, tf32, bf16) and each of L1, BatchTopK dense and BatchTopK sparse:
    tokens/s and the share of this device's measured matmul peak at that precision;
(b) end to end on random-weight Gemma-2-2b-shaped models at the replication's config (batch
    4096, buffer_mult 128, seq_len 1024): one buffer refresh cycle, tokens/s and peak memory;
(c) `train.py --preset toy` on the device (shortened), its exit status and wall time;
(d) the real pair's harvest (Gemma-3-270m, blocks.10), when crossdiff/pairs/realpair.py's build is in data/;
(e) each dense step (L1, BatchTopK; standard and partitioned) under
    torch.cuda.set_sync_debug_mode("error"): "no sync", or the op that synced (a CPU: not run).
`--shape tiny` runs (a) to (c) at toy sizes in about a minute (the CPU test).
"""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crossdiff.config.cli import parse_overrides
from crossdiff.config.presets import GEMMA3_OFFLINE_CFG
from crossdiff.config.schema import DEFAULTS, STEP_DTYPES, ConfigError
from crossdiff.pairs.realpair import pair_dirs
from crossdiff.scale.costs import crosscoder_flops_per_token, sparse_step_flops_per_token
from crossdiff.sources.activations import autocast_context, extract_activations
from crossdiff.sources.models import load_pair, resolve_model_keys
from tools.bench import end_to_end, matmul_peak, model_and_tokens, peak_memory, reset_peak_memory, timed
from trainer import Trainer, matmul_precision

REPO = Path(__file__).resolve().parents[1]  # tools/ -> the repository: scripts run from there

SHAPES = {  # the step's shape, (b)'s config, (c)'s tokens
    "gemma": dict(d_in=2304, dict_size=2**14, batch_size=4096, k=100, steps=10, e2e=dict(seq_len=1024,
                  model_batch_size=4, buffer_mult=128), toy_tokens=400_000, model="gemma", peak_sizes=None),
    "tiny": dict(d_in=64, dict_size=1024, batch_size=512, k=8, steps=2, e2e=dict(seq_len=32, model_batch_size=64,
                 buffer_mult=8, hook_point="blocks.2.hook_resid_pre"), toy_tokens=20_480, model="toy",
                 peak_sizes=(256, 512)),
}
STEPS = (("l1", "l1", False), ("batchtopk dense", "batchtopk", False), ("batchtopk sparse", "batchtopk", True))


class Fixed:
    def __init__(self, x):
        self.x = x

    def next(self):
        return self.x


def base_cfg(shape, device, tmp):
    return dict(DEFAULTS, d_in=shape["d_in"], dict_size=shape["dict_size"], batch_size=shape["batch_size"],
                k=shape["k"], device=device, num_tokens=shape["batch_size"] * 10**6, lr=1e-4, wandb_mode="disabled",
                progress=False, log_every=10**9, save_every=10**9, checkpoint_dir=tmp, norm_estimate_batches=2,
                wrap_tokens=True, hook_point="blocks.14.hook_resid_pre")


def peaks(device, sizes=None):
    """The measured dense matmul peaks, FLOP/s: fp32, tf32 (fp32 at "high" precision), bf16."""
    out = {"fp32": matmul_peak(device, torch.float32, sizes), "bf16": matmul_peak(device, torch.bfloat16, sizes)}
    with matmul_precision("high"):
        out["tf32"] = matmul_peak(device, torch.float32, sizes)
    return out


def step_rows(shape, device, tmp, peak):
    """(a): one row per step_dtype and step kind."""
    x = torch.randn(shape["batch_size"], 2, shape["d_in"], device=device)
    rows = []
    for dtype in STEP_DTYPES:
        for name, architecture, sparse in STEPS:
            cfg = dict(base_cfg(shape, device, tmp), architecture=architecture, step_dtype=dtype, sparse_step=sparse)
            trainer = Trainer(cfg, buffer=Fixed(x))
            t, _ = timed(lambda trainer=trainer: [trainer.step() for _ in range(shape["steps"])], device)
            tokens_per_s = shape["batch_size"] * shape["steps"] / t
            flops = (sparse_step_flops_per_token if sparse else crosscoder_flops_per_token)(cfg)
            rows.append({"step": name, "step_dtype": dtype, "tokens_per_s": tokens_per_s,
                         "peak_share": tokens_per_s * flops / peak[dtype],
                         "loss": float(trainer.step()["loss"])})
            del trainer
    return rows


def end_to_end_row(shape, device, tmp):
    """(b): one refresh cycle on random-weight models of the shape, with the peak memory."""
    cfg = dict(base_cfg(shape, device, tmp), **shape["e2e"])
    reset_peak_memory(device)
    torch.manual_seed(0)
    model, data = model_and_tokens(shape["model"], device, cfg)
    tokens_per_s = end_to_end(cfg, model, data, 1, device)
    return {"tokens_per_s": tokens_per_s, "peak_memory_gib": peak_memory(device)}


def toy_row(shape, device, tmp):
    """(c): the toy preset trained on the device, as a user runs it."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", TQDM_DISABLE="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "train.py", "--preset", "toy", "--device", device, "--num_tokens",
                          str(shape["toy_tokens"]), "--checkpoint_dir", os.path.join(tmp, "toy"),
                          "--wandb_mode", "disabled"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    return {"returncode": out.returncode, "wall_s": time.perf_counter() - t0,
            "final": next((line for line in out.stdout.splitlines() if line.startswith("final: ")), None),
            "stderr_tail": out.stderr[-1500:] if out.returncode else ""}


def real_pair_row(device, batches=4):
    """(d): Gemma-3-270m's harvest at its hook on crossdiff/pairs/realpair.py's cached build; None without it."""
    dirs = pair_dirs(DEFAULTS)
    if not all((d / "config.json").is_file() for d in dirs):
        return None
    cfg = dict(DEFAULTS, **GEMMA3_OFFLINE_CFG)
    cfg.update(device=device, model_names=[str(d) for d in dirs])
    resolve_model_keys(cfg)
    models = load_pair(cfg)
    tokens = torch.randint(1, models[0].cfg.d_vocab, (cfg["model_batch_size"], cfg["seq_len"]), device=device)
    with torch.no_grad(), autocast_context(device):
        t, _ = timed(lambda: [[extract_activations(m, tokens, cfg["hook_point"]) for m in models]
                              for _ in range(batches)], device)
    return {"tokens_per_s": batches * tokens.numel() / t, "hook_point": cfg["hook_point"]}


SYNC_STEPS = (("l1", "l1", {}), ("batchtopk", "batchtopk", {}),
              ("l1 partitioned", "l1", {"exclusive_fraction": 0.05, "shared_fraction": 0.1}),
              ("batchtopk partitioned", "batchtopk", {"exclusive_fraction": 0.05, "shared_fraction": 0.1}))


def sync_rows(shape, device, tmp):
    """(e): a dense step of each kind (after two warm-up steps, the first of which logs) with CUDA's
    sync debug mode raising on any host sync; None on a CPU."""
    if not device.startswith("cuda"):
        return None
    x = torch.randn(shape["batch_size"], 2, shape["d_in"], device=device)
    rows = []
    for name, architecture, partition in SYNC_STEPS:
        trainer = Trainer(dict(base_cfg(shape, device, tmp), architecture=architecture, **partition), buffer=Fixed(x))
        trainer.step(), trainer.step()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            trainer.step()
            result = "no sync"
        except RuntimeError as e:
            result = "synced: " + str(e).splitlines()[0][:200]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        rows.append({"step": name, "result": result})
        del trainer
    return rows


def main(argv):
    options, extras = parse_overrides(argv, {"device": "cuda"}, flags=("out", "shape"))
    device, shape_name = options["device"], extras.get("shape", "gemma")
    if shape_name not in SHAPES:
        raise ConfigError(f"--shape must be one of {list(SHAPES)}, got {shape_name!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device (install the CUDA build of torch 2.13.0)")
    shape, out_path = SHAPES[shape_name], extras.get("out", "gpu_check.json")
    report = {"device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
              "shape": shape_name, "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        report["seconds"] = {}

        def part(name, fn, *args):
            t0 = time.perf_counter()
            report[name] = fn(*args)
            report["seconds"][name] = round(time.perf_counter() - t0, 1)
            print(f"[gpu_check] {name}: {report['seconds'][name]} s", file=sys.stderr, flush=True)

        part("matmul_peak_flops", peaks, device, shape["peak_sizes"])
        part("steps", step_rows, shape, device, tmp, report["matmul_peak_flops"])
        part("end_to_end", end_to_end_row, shape, device, tmp)
        part("toy", toy_row, shape, device, tmp)
        part("sync", sync_rows, shape, device, tmp)
        if shape_name == "gemma":  # (loading the pair takes minutes on a CPU)
            part("real_pair_harvest", real_pair_row, device)
        else:
            report["real_pair_harvest"] = None
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(format_report(report, shape))
    print(f"written: {out_path}")
    return 0 if report["toy"]["returncode"] == 0 else 1


def format_report(r, shape):
    lines = [f"gpu check on {r['device']} (torch {r['torch']}), step shape d_in {shape['d_in']}, dict "
             f"{shape['dict_size']}, batch {shape['batch_size']}, k {shape['k']}",
             f"{'step':<18} {'dtype':<5} {'tokens/s':>12} {'of peak':>8} {'loss':>10}"]
    for row in r["steps"]:
        lines.append(f"{row['step']:<18} {row['step_dtype']:<5} {row['tokens_per_s']:>12,.0f} "
                     f"{row['peak_share']:>8.0%} {row['loss']:>10.4g}")
    e = r["end_to_end"]
    lines.append(f"end to end, one refresh cycle: {e['tokens_per_s']:,.0f} tokens/s, peak memory "
                 f"{e['peak_memory_gib']:.1f} GiB")
    t = r["toy"]
    lines.append(f"toy preset on the device: exit {t['returncode']}, {t['wall_s']:.0f} s; {t['final'] or t['stderr_tail']}")
    h = r["real_pair_harvest"]
    lines.append("real pair harvest: " + (f"{h['tokens_per_s']:,.0f} tokens/s through both models" if h else
                                          "not run (tiny shape) or not built here (python train.py --preset "
                                          "gemma3-270m-offline builds it)"))
    lines.append("host syncs in a dense step: " + ("not run (a CPU)" if r.get("sync") is None else
                                                   "; ".join(f"{x['step']} {x['result']}" for x in r["sync"])))
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"error: {e}")
