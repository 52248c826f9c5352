"""Models of different residual widths in one crosscoder (issue: diffing across families, as the DFC
paper's Llama-3.1-8B against Qwen3-8B, widths 4096 and 2880, arXiv 2602.11729 App. B.1.6).

The reference's layout stays: W_enc [M, D, F] and W_dec [F, M, D] with D = d_in the largest
width. Model m's activations fill the first model_widths[m] coordinates and are zero beyond
(`pad`). Its weights there (encoder rows, decoder columns, decoder bias) are exactly zero from
initialisation and receive no gradient, as a partition's forbidden weights (arch/partition.py):
Adam's moments stay zero, so the weights stay zero. So a decoder norm, the relative norm and every
reconstruction are model m's own; the padding adds no loss, since target and reconstruction are
both zero there.

Shape legend: M models, D d_in (the largest width), F latents, B batch.
"""
import torch


def widths_of(cfg):
    """[M] each model's width: model_widths, or d_in for every model when it is empty."""
    return list(cfg.get("model_widths") or [cfg["d_in"]] * cfg["n_models"])


def is_padded(cfg):
    """Whether some model is narrower than d_in (the padding machinery is then on)."""
    return any(w != cfg["d_in"] for w in widths_of(cfg))


def valid_mask(widths, d_in, device=None):
    """[M, D] bool: coordinate d is model m's own (d < widths[m])."""
    return torch.arange(d_in, device=device)[None, :] < torch.as_tensor(widths, device=device)[:, None]


def pad(x_BD, d_in):
    """One model's activations [..., width] zero-padded to [..., d_in]."""
    return torch.nn.functional.pad(x_BD, (0, d_in - x_BD.shape[-1]))


def project_encoder_grad(grad_MDf, valid_MD):
    return torch.where(valid_MD[..., None], grad_MDf, 0)


def project_decoder_grad(grad_fMD, valid_MD):
    return torch.where(valid_MD[None], grad_fMD, 0)


def project_bias_grad(grad_MD, valid_MD):
    return torch.where(valid_MD, grad_MD, 0)


@torch.no_grad()
def impose_(W_enc_MDf, W_dec_fMD, valid_MD):
    """Zero freshly drawn weights in the padding."""
    W_enc_MDf.mul_(valid_MD[..., None].to(W_enc_MDf.dtype))
    W_dec_fMD.mul_(valid_MD[None].to(W_dec_fMD.dtype))


@torch.no_grad()
def padding_violation(W_enc_MDf, W_dec_fMD, b_dec_MD, valid_MD):
    """The largest |weight| in the padding (must be exactly 0)."""
    pad_MD = ~valid_MD
    parts = [W_enc_MDf.detach().float().abs().amax(-1)[pad_MD], W_dec_fMD.detach().float().abs().amax(0)[pad_MD],
             b_dec_MD.detach().float().abs()[pad_MD]]
    found = torch.cat(parts)
    return float(found.max()) if len(found) else 0.0
