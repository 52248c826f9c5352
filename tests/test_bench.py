import re

import pytest

from conftest import run_script


@pytest.mark.slow
def test_bench_nproc_times_one_and_two_processes_and_prints_the_paper_estimate():
    """A smoke run of `tools/bench.py --nproc 2` (timings are reported, never asserted)."""
    out = run_script("tools/bench.py", "--nproc", "2", "--cycles", "1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line[:1] in ("1", "2") and "x" in line]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][2] == "1.00x"
    assert "8 H100 SXM" in out.stdout and "all-reduce of 604 MB" in out.stdout


@pytest.mark.slow
def test_bench_runs_at_the_toy_shape_and_checks_activation_equality():
    """A smoke run (timings are reported, never asserted)."""
    out = run_script("tools/bench.py", "--shape", "toy", "--steps", "5", "--cycles", "1", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "activations equal: True" in out.stdout
    for line in ("harvest, ours", "harvest, reference", "crosscoder step, fp32", "crosscoder step, bf16",
                 "end to end, ours", "end to end, reference (refresh bug fixed)", "end to end, reference as shipped",
                 "ours / reference as shipped", "of the fp32 peak", "of the bf16 peak",
                 "peak process RSS", "activation store", "largest relative loss difference", "400M tokens"):
        assert line in out.stdout


@pytest.mark.slow
def test_bench_sweep_times_one_crosscoder_and_a_sweep_on_one_harvest():
    """The sweep trains each member on every harvested row (the refresh count is asserted inside
    end_to_end), and the report states the speed-up over separate runs."""
    out = run_script("tools/bench.py", "--sweep", "2", "--cycles", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "end to end, one crosscoder" in out.stdout and "end to end, sweep of 2 (each)" in out.stdout
    assert "2 crosscoders on 1M tokens each" in out.stdout and "x faster" in out.stdout


def test_bench_times_the_sparse_batchtopk_step_against_the_dense_one():
    """`tools/bench.py --architecture batchtopk --step_only`: the dense steps, the sparse one and the
    speed-up line (timings reported, never asserted)."""
    import re

    out = run_script("tools/bench.py", "--shape", "toy", "--architecture", "batchtopk", "--k", "8", "--step_only",
                     "--steps", "3", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "batchtopk k 8" in out.stdout and "crosscoder step, fp32, sparse" in out.stdout
    assert re.search(r"sparse/dense BatchTopK step speed-up: \d+\.\d\dx", out.stdout)


_FAKE_PEER_TRAINER = '''
import torch
from ..dictionary import Linear  # a relative import, as the peer's modules make


class BatchTopKCrossCoderTrainer:
    def __init__(self, steps, activation_dim, dict_size, k, layer, lm_name, num_layers, device, seed):
        self.ae = Linear(activation_dim, dict_size)
        self.calls = 0

    def update(self, step, x):
        assert step == self.calls and x.shape[1:] == (2, 768)
        self.calls += 1
        x.mul_(0)  # the peer normalises its input in place: the next variant must still get the batch
        return float(self.ae(x).sum())
'''


def test_the_peer_bench_imports_the_peers_modules_without_its_package_init_and_prints_one_row_per_size(tmp_path):
    """tools/bench_peer.py on a stand-in checkout (the real one is science-of-finetuning's): its
    package __init__ files, which import what the step does not use, are skipped; relative imports
    resolve; each dictionary size gets a row of three timings; a path without the trainer is an
    error naming it. (Timings are reported, never asserted.)"""
    root = tmp_path / "peer" / "dictionary_learning"
    (root / "trainers").mkdir(parents=True)
    for init in (root / "__init__.py", root / "trainers" / "__init__.py"):
        init.write_text("import nnsight  # not installed: the bench must not run this\n")
    (root / "dictionary.py").write_text("import torch\n\nclass Linear(torch.nn.Linear):\n"
                                        "    def __init__(self, d, f):\n        super().__init__(2 * d, f)\n\n"
                                        "    def forward(self, x):\n        return super().forward(x.flatten(1))\n")
    (root / "trainers" / "crosscoder.py").write_text(_FAKE_PEER_TRAINER)
    out = run_script("tools/bench_peer.py", "--peer", str(tmp_path / "peer"), "--dict_sizes", "64,128", "--rounds", "2",
                     "--compile", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] in (["64"], ["128"])]
    assert [r[0] for r in rows] == ["64", "128"] and all(len(r) == 6 and r[3].endswith("x)") for r in rows)
    apart = [float(m) for m in re.findall(r"torch.compile'd dense step .* the weights differ by (\S+) of", out.stdout)]
    assert len(apart) == 2 and max(apart) < 1e-4  # the compiled step follows the eager one
    missing = run_script("tools/bench_peer.py", "--peer", str(tmp_path), timeout=120)
    assert missing.returncode != 0 and "no dictionary_learning/trainers/crosscoder.py there" in missing.stderr


_FAKE_REFERENCE = '''from utils import *  # the reference's notebook utils: the bench hands it torch, einops, numpy and Path
from typing import NamedTuple

SAVE_DIR = Path("/workspace/checkpoints")


class LossOutput(NamedTuple):
    l2_loss: torch.Tensor
    l1_loss: torch.Tensor


class CrossCoder(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.W = torch.nn.Parameter(torch.zeros(2, cfg["d_in"], cfg["dict_size"]))

    def get_losses(self, x):
        acts = torch.relu(einops.einsum(x, self.W, "b m d, m d f -> b f"))
        return LossOutput(l2_loss=x.pow(2).sum(-1).mean() + acts.sum() * 0, l1_loss=acts.sum(-1).mean())
'''


def test_the_reference_bench_times_the_references_l1_step_beside_ours(tmp_path):
    """tools/bench_peer.py --reference on a stand-in checkout: its crosscoder.py imports from the
    bench's stand-in utils, one row per size, and a path without crosscoder.py is an error."""
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "crosscoder.py").write_text(_FAKE_REFERENCE)
    out = run_script("tools/bench_peer.py", "--reference", str(tmp_path / "ref"), "--dict_sizes", "64", "--rounds", "1",
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines() if line.split()[:1] == ["64"]]
    assert len(rows) == 1 and len(rows[0]) == 4 and rows[0][3].endswith("x)")
    missing = run_script("tools/bench_peer.py", "--reference", str(tmp_path), timeout=120)
    assert missing.returncode != 0 and "no crosscoder.py there" in missing.stderr
