"""One rank of tests/test_distributed.py, started by torchrun: trains a tiny crosscoder on its
share of seeded global batches and writes its final weights and logs to argv[1].rank<r>."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(1)

import distributed  # noqa: E402
from conftest import tiny_cfg  # noqa: E402
from trainer import Trainer  # noqa: E402


class GlobalBatches:
    """The same seeded global batches on every rank; each rank is served its contiguous share."""

    def __init__(self, cfg, share):
        self.g, self.share = torch.Generator().manual_seed(0), share
        self.shape = (cfg["batch_size"], cfg["n_models"], cfg["d_in"])

    def next(self):
        return torch.randn(*self.shape, generator=self.g)[self.share]


if __name__ == "__main__":
    out, steps, architecture = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    distributed.setup("cpu")
    cfg = tiny_cfg(num_tokens=32 * 20, architecture=architecture, k=4, checkpoint_dir=os.path.dirname(out))
    trainer = Trainer(cfg, buffer=GlobalBatches(cfg, distributed.shard(cfg["batch_size"])))
    logs = [trainer.log(trainer.step()) for _ in range(steps)]
    weights = {k: v.detach() for k, v in trainer.crosscoder.state_dict().items()}
    torch.save({"weights": weights, "logs": logs}, f"{out}.rank{distributed.rank()}")
    distributed.teardown()
    distributed.exit_process(0)
