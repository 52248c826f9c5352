"""The diff-SAE's maths (Aranguri, Drori, Nanda 2025, "SAE on activation differences"): a BatchTopK
SAE on h_chat - h_base, held in the crosscoder's layout so that every tool reads it as it reads a
crosscoder (DiffSAE in crosscoder.py is the architecture built from these):
    W_enc[base] = -W_enc[chat]     encode(x) reads x_chat - x_base
    W_dec[:, base] = 0, b_dec[base] = 0   decode gives [0, the difference's reconstruction]
so the KL test's patch h_base + sum_j f_j (d_j^chat - d_j^base) is the diff-SAE's h_base + sum_j
f_j d_j, relative decoder norms are 1 (every latent lives in the difference), and Latent Scaling
asks how much of d_j the base activation already holds (docs/design.md, "The diff-SAE").

Adam keeps W_enc[base] = -W_enc[chat] exactly: the two slices get opposite gradients, and Adam's
update of -g is exactly minus its update of g (so are clipping and the data-parallel mean).

Shape legend: B batch, M models (2), D d_in, F latents.
"""
import torch

BASE, CHAT = 0, 1


def difference_target(x_BMD):
    """[B, 2, D]: what the diff-SAE reconstructs, 0 for the base and x_chat - x_base for the chat
    model. Idempotent: a target's target is itself (its base slot is already 0)."""
    out_BMD = torch.zeros_like(x_BMD)
    out_BMD[:, CHAT] = x_BMD[:, CHAT] - x_BMD[:, BASE]
    return out_BMD


def project_encoder_grad(grad_MDF):
    """The gradient of W_enc = [-W, W] with respect to its one free matrix W, given back to both
    slices: d/dW = g_chat - g_base, so the chat slice gets it and the base slice its negative."""
    g_DF = grad_MDF[CHAT] - grad_MDF[BASE]
    return torch.stack([-g_DF, g_DF])  # [base, chat]


def project_decoder_grad(grad_FMD):
    """The base decoder receives no gradient: it stays exactly 0."""
    out_FMD = grad_FMD.clone()
    out_FMD[:, BASE] = 0
    return out_FMD


@torch.no_grad()
def impose_(W_enc_MDF, W_dec_FMD):
    """Make freshly initialised weights a diff-SAE: the base encoder the chat one's negative, the
    base decoder zero."""
    W_enc_MDF[BASE] = -W_enc_MDF[CHAT]
    W_dec_FMD[:, BASE] = 0


@torch.no_grad()
def violations(W_enc_MDF, W_dec_FMD, b_dec_MD):
    """{"forbidden": the largest |weight| of the base decoder and decoder bias (must be 0),
    "tied": the largest |W_enc[base] + W_enc[chat]| relative to the largest |W_enc[chat]|}
    (partition.check_violations reads them)."""
    forbidden = torch.cat([W_dec_FMD[:, BASE].detach().float().abs().flatten(),
                           b_dec_MD[BASE].detach().float().abs()]).max()
    enc = W_enc_MDF.detach().float()
    scale = enc[CHAT].abs().max().clamp_min(1e-30)
    return {"forbidden": float(forbidden), "tied": float((enc[BASE] + enc[CHAT]).abs().max() / scale)}
