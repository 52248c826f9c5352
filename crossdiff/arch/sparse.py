"""Sparse BatchTopK steps: a step that keeps k latents per token computes only what those latents
need. The encoder's forward stays dense (the selection needs every score), but
    decode                 x_hat[b] = sum over kept (b, j) of f_bj W_dec[j]
is a gather-and-sum (`torch.nn.functional.embedding_bag` with per-sample weights: no [B, F]
product and no [kept, M, D] copy), whose backward gives W_dec's gradient (an index-add over the
kept rows) and the kept values' gradient; and the encoder's weight gradient is the sparse product
    grad W_enc[:, j] = sum over kept (b, j) of g_bj x[b]
(`KeptPreactivations`: a [F, B] sparse matrix times the [B, M*D] inputs). Per token that is about
2·M·D·F + 8·M·D·k FLOPs instead of the dense step's 10·M·D·F (EleutherAI's sparsify decodes TopK
SAEs the same way). The dense path (crosscoder.py) stays the reference; tests/test_sparse.py
compares the two. Plain torch ops: the same code runs on CPU and CUDA.

Shape legend: B batch, M models, D d_in, F latents (this shard's), K = M * D, N kept entries.
"""
from typing import NamedTuple

import torch


class Kept(NamedTuple):
    """The kept entries of a [B, F] selection, row-major: rows_N, cols_N, and offsets_B (where each
    row's entries start, as embedding_bag takes bags)."""
    rows: torch.Tensor
    cols: torch.Tensor
    offsets: torch.Tensor


def kept_entries(mask_BF):
    """Kept of a boolean [B, F] mask (nonzero's order is row-major, as embedding_bag needs)."""
    rows, cols = mask_BF.nonzero(as_tuple=True)
    offsets = torch.searchsorted(rows, torch.arange(mask_BF.shape[0], device=rows.device))
    return Kept(rows, cols, offsets)


class KeptPreactivations(torch.autograd.Function):
    """The pre-activations x @ W_enc + b_enc at the kept entries, given them from the dense forward
    (computed without a graph): the backward gives W_enc and b_enc their gradients from the kept
    entries only, none to x (the crosscoder's inputs are data)."""

    @staticmethod
    def forward(ctx, pre_N, x_BK, W_enc_MDF, b_enc_F, rows_N, cols_N):
        ctx.save_for_backward(x_BK, rows_N, cols_N)
        ctx.shape = W_enc_MDF.shape
        return pre_N.view_as(pre_N)

    @staticmethod
    def backward(ctx, grad_N):
        x_BK, rows_N, cols_N = ctx.saved_tensors
        M, D, F = ctx.shape
        grad_N = grad_N.to(x_BK.dtype)
        S_FB = torch.sparse_coo_tensor(torch.stack([cols_N, rows_N]), grad_N, (F, x_BK.shape[0]), check_invariants=False)
        grad_W_FK = torch.sparse.mm(S_FB, x_BK)
        grad_b_F = torch.zeros(F, dtype=grad_N.dtype, device=grad_N.device).index_add_(0, cols_N, grad_N)
        return None, None, grad_W_FK.T.reshape(M, D, F), grad_b_F, None, None


def kept_preactivations(pre_BF, x_BMD, W_enc_MDF, b_enc_F, kept):
    """[N] the kept entries' pre-activations, differentiable in W_enc and b_enc (sparsely)."""
    pre_N = pre_BF.detach()[kept.rows, kept.cols]
    x_BK = x_BMD.reshape(x_BMD.shape[0], -1).to(W_enc_MDF.dtype)
    return KeptPreactivations.apply(pre_N, x_BK, W_enc_MDF, b_enc_F, kept.rows, kept.cols)


def sparse_decode(values_N, kept, W_dec_FMD):
    """[B, M, D] = sum over each row's kept entries of value x that latent's decoder rows, without
    the decoder bias (embedding_bag: W_dec's and the values' gradients, both sparse in effect)."""
    F, M, D = W_dec_FMD.shape
    out_BK = torch.nn.functional.embedding_bag(kept.cols, W_dec_FMD.reshape(F, M * D), kept.offsets, mode="sum",
                                               per_sample_weights=values_N.to(W_dec_FMD.dtype))
    return out_BK.view(-1, M, D)


def kept_activations(values_N, kept, shape):
    """The [B, F] activations the kept entries make, as a sparse COO tensor (no gradient): B * k
    entries where a dense matrix holds B * F (16 GiB in fp32 at 2^20 latents and 4096 rows)."""
    return torch.sparse_coo_tensor(torch.stack([kept.rows, kept.cols]), values_N.detach(), shape, is_coalesced=True,
                                   check_invariants=False, device=values_N.device)  # (nonzero's order: coalesced)


def fired_latents(acts_BF):
    """[F] bool: the latents active anywhere in the batch, of dense activations or of
    kept_activations' sparse ones (no host sync either way)."""
    if acts_BF.is_sparse:
        cols, values = acts_BF.indices()[1], acts_BF.values()
        return torch.zeros(acts_BF.shape[1], device=values.device).index_add_(0, cols, (values > 0).float()) > 0
    return (acts_BF.detach() > 0).any(0)
