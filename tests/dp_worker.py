"""One rank of the two-process tests (tests/test_distributed.py, test_sweep.py, test_store.py),
started by torchrun: `dp_worker.py OUT_DIR SPEC ...` runs each SPEC, `mode` or `mode@shards`
(latent_shards, default 1), one after the other in this one launch (each torchrun start costs
two processes' imports of torch and transformer_lens), and writes what it returns to
OUT_DIR/SPEC.rank<r>. conftest.py's two_rank_runs fixture launches it."""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

from conftest import tiny_cfg  # noqa: E402
from crossdiff.scale import distributed
from trainer import Trainer  # noqa: E402


class GlobalBatches:
    """The same seeded global batches on every rank; each rank is served its contiguous share."""

    def __init__(self, cfg, share):
        self.g, self.share = torch.Generator().manual_seed(0), share
        self.shape = (cfg["batch_size"], cfg["n_models"], cfg["d_in"])

    def next(self):
        return torch.randn(*self.shape, generator=self.g)[self.share]


STEPS = 6  # the training steps of the data-parallel and the shard modes


def run(architecture, out, shards, steps=STEPS):
    """One mode of this rank, writing beside out (OUT_DIR/SPEC); returns what it writes to
    out.rank<r> (None: nothing)."""
    if architecture in ("straight", "half", "resume"):  # the tiny models on real buffers, 24 steps
        from conftest import random_tokens, tiny_model

        ckpt = os.path.join(os.path.dirname(out), f"{architecture if architecture == 'straight' else 'halves'}@{shards}")
        cfg = tiny_cfg(num_tokens=32 * 24, checkpoint_dir=ckpt, latent_shards=shards)
        models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(600, 9)
        if architecture == "resume":
            trainer = Trainer.resume(os.path.join(ckpt, "version_0"), cfg, models=models, tokens=tokens)
        else:
            trainer = Trainer(cfg, models=models, tokens=tokens)
        if architecture == "half":  # 12 of the 24 steps, then a checkpoint
            for _ in range(12):
                trainer.step()
            trainer.save()
        else:
            trainer.train()
        result = {"weights": {k: v.detach() for k, v in trainer.crosscoder.state_dict().items()},
                  "token_pointer": trainer.buffer.token_pointer, "step": trainer.step_counter}
    elif architecture in ("sweep_signal", "sweep_resume"):  # a sweep on real buffers, stopped, resumed
        from conftest import random_tokens, tiny_model
        from sweep import Sweep
        from trainer import TrainingInterrupted

        ckpt = os.path.join(os.path.dirname(out), f"sweep@{shards}")
        cfg = tiny_cfg(num_tokens=32 * 24, checkpoint_dir=ckpt, latent_shards=shards)
        models, tokens = [tiny_model(1), tiny_model(2)], random_tokens(600, 9)
        result = {}
        if architecture == "sweep_signal":  # SIGTERM to rank 1 alone after 12 steps
            run = Sweep(cfg, {"l1_coeff": [3.0, cfg["l1_coeff"]]}, models=models, tokens=tokens)
            step = run.step

            def step_then_signal():
                logs = step()
                if distributed.rank() == 1 and run.trainers[0].step_counter == 12:
                    os.kill(os.getpid(), signal.SIGTERM)
                return logs

            run.step = step_then_signal
            try:
                run.train()
            except TrainingInterrupted as e:
                result["stopped"] = e.step
        else:
            run = Sweep.resume(os.path.join(ckpt, "sweep_0"), lambda saved: dict(cfg, **saved), models=models,
                               tokens=tokens)
            run.train()
        result["weights"] = [{k: v.detach() for k, v in t.crosscoder.state_dict().items()} for t in run.trainers]
        result["steps"] = [t.step_counter for t in run.trainers]
    elif architecture == "harvest":  # store.harvest of 50 sequences, 8 per shard, into argv[1]
        from conftest import random_tokens, tiny_model
        from crossdiff.sources.store import harvest

        cfg = tiny_cfg(checkpoint_dir=os.path.dirname(out))
        harvest(cfg, [tiny_model(1), tiny_model(2)], random_tokens(50, 9), out, 50, shard_sequences=8)
        result = {}
    elif architecture == "save_fails":  # rank 0's checkpoint write fails at step 5: both ranks must stop
        from crosscoder import CrossCoder

        def failing_save(self, *args, **kwargs):
            raise OSError(28, "No space left on device")

        real_save = CrossCoder.save
        if distributed.is_main():
            CrossCoder.save = failing_save
        cfg = tiny_cfg(num_tokens=32 * 20, save_every=5, checkpoint_dir=os.path.join(os.path.dirname(out), "save_fails"))
        trainer = Trainer(cfg, buffer=GlobalBatches(cfg, distributed.shard(cfg["batch_size"])))
        try:
            trainer.train()
            result = {"error": None}
        except OSError as e:
            result = {"error": str(e), "step": trainer.step_counter}
        finally:
            CrossCoder.save = real_save
    elif architecture == "convert_tokens":  # both ranks ask for an uncached hub dataset
        import datasets

        from utils import load_tokens

        conversions = os.path.join(os.path.dirname(out), "conversions")
        data_dir = os.path.join(os.path.dirname(out), "tokens")

        def fake_load_dataset(name, split):  # the hub, offline: counts who downloads
            with open(conversions, "a") as f:
                f.write(f"{distributed.rank()}\n")
            return datasets.Dataset.from_dict({"input_ids": [[2, i, i + 1, i + 2] for i in range(40)]})

        datasets.load_dataset = fake_load_dataset
        tokens = load_tokens("someone/tokenized-data", {"data_dir": data_dir})
        result = {"tokens": tokens}
    elif architecture == "shard":  # l1 and BatchTopK over the mesh, then a forward and its gradients
        result = {a: shard_run(a, out, shards, steps) for a in ("l1", "batchtopk")}
    elif architecture == "partition":  # the same, partitioned: exclusive, designated shared and free blocks
        result = {a: shard_run(a, out, shards, steps, **PARTITION) for a in ("l1", "batchtopk")}
        # and with model 1 narrower (arch/widths.py): its padding composed with the partition
        result["padded"] = shard_run("batchtopk", out, shards, steps, exclusive_fraction=0.125, **WIDTHS)
    elif architecture == "sparse":  # BatchTopK's sparse step, standard and partitioned, and the diff-SAE's
        result = {"batchtopk": shard_run("batchtopk", out, shards, steps, sparse_step=True),
                  "partitioned": shard_run("batchtopk", out, shards, steps, sparse_step=True, **PARTITION),
                  "diff_sae": shard_run("diff_sae", out, shards, steps, sparse_step=True)}
    elif architecture == "topk":  # one BatchTopK selection over both ranks' halves of a batch
        from crossdiff.arch.batchtopk import batch_topk_mask

        scores_BF = torch.relu(torch.randn(16, 40, generator=torch.Generator().manual_seed(3)))
        mask, min_kept = batch_topk_mask(scores_BF[distributed.shard(16)], 5, distributed.group())
        result = {"mask": mask, "min_kept": min_kept}
    else:
        cfg = tiny_cfg(num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2, dead_tokens=64, threshold_start_step=0,
                       checkpoint_dir=os.path.join(os.path.dirname(out), architecture))
        trainer = Trainer(cfg, buffer=GlobalBatches(cfg, distributed.shard(cfg["batch_size"])))
        logs = [trainer.log(trainer.step()) for _ in range(steps)]
        result = {"weights": {k: v.detach() for k, v in trainer.crosscoder.state_dict().items()}, "logs": logs}
    return result


PARTITION = {"exclusive_fraction": 0.125, "shared_fraction": 0.125}  # blocks of 8, 8, 8 and 40 latents
WIDTHS = {"model_widths": [32, 24]}  # model 1 zero-padded from 24 to d_in 32


def shard_run(architecture, out, shards, steps, **extra):
    """The dictionary split over latent_shards (or data parallel with 1): steps, a save, then a
    training-mode forward on a fixed batch and the gradients of l2 + l1 on it."""
    cfg = tiny_cfg(num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2, dead_tokens=64,
                   threshold_start_step=0, latent_shards=shards, **extra,
                   checkpoint_dir=os.path.join(os.path.dirname(out), f"ckpt_{architecture}_{shards}_{'_'.join(extra)}"))
    trainer = Trainer(cfg, buffer=GlobalBatches(cfg, distributed.shard(cfg["batch_size"])))
    logs = [trainer.log(trainer.step()) for _ in range(steps)]
    trainer.save()
    x = torch.randn(32, 2, cfg["d_in"], generator=torch.Generator().manual_seed(7))
    x = x if shards > 1 else x[distributed.shard(32)]  # a latent group sees its whole batch
    weights = {k: v.detach().clone() for k, v in trainer.crosscoder.state_dict().items()}
    losses, acts, _ = trainer.crosscoder.losses_and_acts(x, mesh=trainer.mesh)
    (losses.l2_loss + losses.l1_loss).backward()
    grads = {name: p.grad for name, p in trainer.crosscoder.named_parameters()}
    acts = acts.to_dense() if acts.is_sparse else acts  # (the sparse step's: its kept entries)
    return {"weights": weights, "logs": logs, "acts": acts.detach(), "grads": grads,
            "save_dir": str(trainer.crosscoder.save_dir)}


if __name__ == "__main__":
    out_dir, specs = sys.argv[1], sys.argv[2:]
    for spec in specs:
        mode, _, shards = spec.partition("@")
        shards = int(shards or 1)
        distributed.setup("cpu", latent_shards=shards)  # the same processes, this spec's mesh
        result = run(mode, os.path.join(out_dir, spec), shards)
        if result:
            torch.save(result, os.path.join(out_dir, f"{spec}.rank{distributed.rank()}"))
    distributed.teardown()
    distributed.exit_process(0)
