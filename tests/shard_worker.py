"""One rank of tests/test_distributed.py, started by torchrun: trains a tiny crosscoder split over
latent_shards (argv[3]) on its share of seeded global batches, for each architecture of argv[2]
(comma-separated), saves it, and writes its local weights, logs and a final training-mode
selection to argv[1].<architecture>.rank<r>."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import distributed  # noqa: E402
from conftest import tiny_cfg  # noqa: E402
from dp_worker import GlobalBatches  # noqa: E402
from trainer import Trainer  # noqa: E402

if __name__ == "__main__":
    out, architectures, shards, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    distributed.setup("cpu", latent_shards=shards)
    for architecture in architectures.split(","):  # several in one launch: each torchrun start costs seconds
        cfg = tiny_cfg(num_tokens=32 * 20, architecture=architecture, k=4, dead_window=2, dead_tokens=64,
                       threshold_start_step=0, latent_shards=shards,
                       checkpoint_dir=os.path.join(os.path.dirname(out), f"ckpt_{architecture}_{shards}"))
        trainer = Trainer(cfg, buffer=GlobalBatches(cfg, distributed.shard(cfg["batch_size"])))
        logs = [trainer.log(trainer.step()) for _ in range(steps)]
        trainer.save()
        x = torch.randn(32, 2, cfg["d_in"], generator=torch.Generator().manual_seed(7))
        x = x if shards > 1 else x[distributed.shard(32)]  # a latent group sees its whole batch
        weights = {k: v.detach().clone() for k, v in trainer.crosscoder.state_dict().items()}
        losses, acts, _ = trainer.crosscoder.losses_and_acts(x, mesh=trainer.mesh)  # and the gradients of l2 + l1 on x
        (losses.l2_loss + losses.l1_loss).backward()
        grads = {name: p.grad for name, p in trainer.crosscoder.named_parameters()}
        torch.save({"weights": weights, "logs": logs, "acts": acts.detach(), "grads": grads,
                    "save_dir": str(trainer.crosscoder.save_dir)}, f"{out}.{architecture}.rank{distributed.rank()}")
    distributed.teardown()
    distributed.exit_process(0)
