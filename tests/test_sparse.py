"""sparse.py and BatchTopK's sparse step: equal to the dense reference path to 1e-5 in fp32."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import tiny_cfg
from crosscoder import CrossCoder
from crossdiff.arch.sparse import fired_latents, kept_activations, kept_entries, kept_preactivations, sparse_decode
from trainer import Trainer

PARTITIONS = [{}, {"exclusive_fraction": 0.125, "shared_fraction": 0.125}]


def test_kept_entries_decode_and_their_gradients_equal_the_dense_product():
    g = torch.Generator().manual_seed(0)
    acts_BF = torch.relu(torch.randn(6, 10, generator=g)) * (torch.rand(6, 10, generator=g) < 0.3)
    acts_BF[2] = 0  # a row without any kept latent: an empty bag
    W_FMD = torch.randn(10, 2, 4, generator=g, requires_grad=True)
    kept = kept_entries(acts_BF > 0)
    values_N = acts_BF[kept.rows, kept.cols].clone().requires_grad_()
    out = sparse_decode(values_N, kept, W_FMD)
    want = torch.einsum("bf,fmd->bmd", kept_activations(values_N, kept, (6, 10)).to_dense(), W_FMD)
    torch.testing.assert_close(out, want)
    (out * torch.arange(48.0).view(6, 2, 4)).sum().backward()
    dense_values = acts_BF.clone().requires_grad_()
    W2 = W_FMD.detach().clone().requires_grad_()
    (torch.einsum("bf,fmd->bmd", dense_values, W2) * torch.arange(48.0).view(6, 2, 4)).sum().backward()
    torch.testing.assert_close(W_FMD.grad, W2.grad)
    torch.testing.assert_close(values_N.grad, dense_values.grad[kept.rows, kept.cols])


def test_the_kept_activations_are_the_selection_as_a_sparse_tensor_and_say_which_latents_fired():
    """The sparse step hands the trainer its activations as a sparse tensor of the kept entries:
    densified, the selection itself; the latents fired in it are those of the dense matrix."""
    g = torch.Generator().manual_seed(4)
    acts_BF = torch.relu(torch.randn(9, 30, generator=g)) * (torch.rand(9, 30, generator=g) < 0.1)
    kept = kept_entries(acts_BF > 0)
    sparse_BF = kept_activations(acts_BF[kept.rows, kept.cols], kept, acts_BF.shape)
    assert sparse_BF.is_sparse and sparse_BF._nnz() == int((acts_BF > 0).sum())
    assert torch.equal(sparse_BF.to_dense(), acts_BF)
    want_F = torch.tensor([bool((acts_BF[:, f] > 0).any()) for f in range(30)])
    assert 0 < int(want_F.sum()) < 30
    assert torch.equal(fired_latents(sparse_BF), want_F) and torch.equal(fired_latents(acts_BF), want_F)


def test_kept_preactivations_give_the_encoder_the_dense_gradient_of_the_kept_entries():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2, 5, generator=g)
    W = torch.randn(2, 5, 12, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    pre = torch.einsum("bmd,mdf->bf", x, W) + b
    mask = torch.rand(8, 12, generator=g) < 0.25
    kept = kept_entries(mask)
    weights = torch.randn(len(kept.rows), generator=g)
    got = kept_preactivations(pre, x, W, b, kept)
    torch.testing.assert_close(got, pre.detach()[mask])
    (got * weights).sum().backward()
    grad_W, grad_b = W.grad.clone(), b.grad.clone()
    W.grad, b.grad = None, None
    dense = torch.zeros(8, 12)
    dense[kept.rows, kept.cols] = weights
    (pre * dense).sum().backward()
    torch.testing.assert_close(grad_W, W.grad)
    torch.testing.assert_close(grad_b, b.grad)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_a_sparse_step_equals_the_dense_step_losses_terms_and_every_gradient(partition):
    """Training mode, AuxK over dead latents acting: the losses, the activations, AuxK and the
    l2 norm loss, and the gradients of the training loss of every parameter."""
    cfg = tiny_cfg(architecture="batchtopk", k=4, aux_k=8, **partition)
    dense, sparse = CrossCoder(cfg).train(), CrossCoder(dict(cfg, sparse_step=True)).train()
    with torch.no_grad():
        dense.b_enc.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(3))
        sparse.b_enc.copy_(dense.b_enc)
    x = torch.randn(32, 2, 32, generator=torch.Generator().manual_seed(2))
    dead_F = torch.arange(64) % 3 == 0
    results = []
    for cc in (dense, sparse):
        losses, acts, terms = cc.losses_and_acts(x, dead_F=dead_F)
        (terms["l2_norm_loss"] + 0.03 * terms["aux_loss"] + losses.l2_loss).backward()
        results.append((losses, acts, terms, {n: p.grad for n, p in cc.named_parameters()}))
    (dl, da, dt, dg), (sl, sa, st, sg) = results
    assert float(dt["aux_loss"]) > 0
    for a, b in zip(dl, sl):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert sa.is_sparse and sa._nnz() == int((da > 0).sum())  # the kept entries alone, not a [B, F] matrix
    torch.testing.assert_close(sa.to_dense(), da.detach(), atol=1e-5, rtol=1e-5)
    for key in ("aux_loss", "l2_norm_loss"):
        torch.testing.assert_close(st[key], dt[key], atol=1e-5, rtol=1e-5)
    for name in dg:
        torch.testing.assert_close(sg[name], dg[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.threshold, dense.threshold)


@pytest.mark.parametrize("partition", PARTITIONS)
def test_sparse_training_reaches_the_dense_runs_weights(partition):
    """30 steps of the Trainer (Adam, clipping, AuxK as latents die, the threshold): the weights
    and the logged metrics equal the dense run's to 1e-5."""
    runs = []
    for sparse in (False, True):
        cfg = tiny_cfg(architecture="batchtopk", k=4, dead_tokens=64, threshold_start_step=5, num_tokens=32 * 30,
                       sparse_step=sparse, **partition)
        g = torch.Generator().manual_seed(0)

        class Batches:
            def next(self):
                return torch.randn(32, 2, 32, generator=g) * (torch.rand(32, 1, 1, generator=g) < 0.6)

        trainer = Trainer(cfg, buffer=Batches())
        logs = [trainer.step() for _ in range(30)]
        runs.append((trainer.crosscoder, logs))
    (dense, dense_logs), (sparse, sparse_logs) = runs
    assert max(float(log["aux_loss"]) for log in dense_logs) > 0
    for name, want in dense.state_dict().items():
        torch.testing.assert_close(sparse.state_dict()[name], want, atol=1e-5, rtol=1e-5)
    for key in ("loss", "l2_loss", "l0_loss", "aux_loss", "explained_variance"):
        torch.testing.assert_close(torch.stack([log[key] for log in sparse_logs]),
                                   torch.stack([log[key] for log in dense_logs]), atol=1e-5, rtol=1e-5)


class FloatMatrices(TorchDispatchMode):
    """The ops that make a new float tensor of numel elements, of any shape (a matmul's may be
    [1, B, F]); views and in-place results, which share an input's storage, are not new."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.made = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel() == self.numel
                    and t.is_floating_point() and t.untyped_storage().data_ptr() not in inputs):
                self.made.append(str(func))
        return out


@pytest.mark.parametrize("partition", PARTITIONS)
def test_a_sparse_step_makes_three_float_batch_by_latent_matrices(partition):
    """At 2^20 latents and 4096 rows a float [B, F] matrix is 16 GiB: the sparse step with AuxK
    acting makes three (the pre-activations, the scores, AuxK's ranking), the dense step more."""
    cfg = tiny_cfg(architecture="batchtopk", k=4, aux_k=8, batch_size=40, dead_tokens=40, threshold_start_step=0,
                   dict_size=96, **partition)  # (B * F = 40 * 96: no other tensor of the step has as many elements)
    made = {}
    for sparse in (False, True):
        g = torch.Generator().manual_seed(0)
        trainer = Trainer(dict(cfg, sparse_step=sparse), buffer=type("S", (), {"next": lambda s: torch.randn(40, 2, 32, generator=g)})())
        trainer.step()  # a latent that did not fire in it is dead at the next (dead_tokens: one batch)
        with FloatMatrices(40 * 96) as mode:
            trainer.step()
        made[sparse] = mode.made
    assert len(made[True]) == 3, made[True]
    assert len(made[False]) > 3, made[False]
