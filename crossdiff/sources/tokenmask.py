"""Which token positions count, in training, the normalisation estimate and the analysis: the
first ignore_first_n of every row are dropped (the BOS the rows start with, or a chat template's
header: Minder et al. drop 25 on Llama 3.x), and optionally the positions of chosen tokens
(exclude_tokens: template or special tokens) and those whose activation norm in any model exceeds
outlier_norm_multiple times the batch's median (the DFC paper's 2x: attention sinks).

Shape legend: n sequences, S seq_len, P positions kept per row (S - first), M models, D d_in.
"""
import torch

from crossdiff.config.plan import first_n
from crossdiff.config.schema import ConfigError


def excluded_ids(cfg, tokenizer=None):
    """The token ids of config key exclude_tokens: each entry an id, or a token string read with
    the models' tokenizer (a ConfigError when it has no such token or there is no tokenizer)."""
    ids = []
    for entry in cfg.get("exclude_tokens") or []:
        if entry.lstrip("-").isdigit():
            ids.append(int(entry))
            continue
        if tokenizer is None:
            raise ConfigError(f"exclude_tokens: {entry!r} is a token string, but the models have no tokenizer to "
                              "read it: give its id")
        token_id = tokenizer.convert_tokens_to_ids(entry)
        if token_id is None or token_id == tokenizer.unk_token_id and entry != tokenizer.unk_token:
            raise ConfigError(f"exclude_tokens: the tokenizer has no token {entry!r}")
        ids.append(int(token_id))
    return torch.tensor(sorted(set(ids)), dtype=torch.long, device="cpu")


def keep_mask(tokens_nP, acts_nPMD, exclude_ids=None, outlier_multiple=0.0):
    """[n, P] bool: the positions that count, given their tokens and activations: not one of
    exclude_ids, and, when outlier_multiple > 0, no model's activation norm above outlier_multiple
    times that model's median norm over these positions."""
    keep = torch.ones(tokens_nP.shape, dtype=torch.bool, device=tokens_nP.device)
    if exclude_ids is not None and len(exclude_ids):
        keep &= ~torch.isin(tokens_nP, exclude_ids.to(tokens_nP.device))
    if outlier_multiple:
        norms_nPM = acts_nPMD.float().norm(dim=-1)
        median_M = norms_nPM.flatten(0, 1).median(dim=0).values
        keep &= (norms_nPM <= outlier_multiple * median_M).all(dim=-1)
    return keep


class PositionFilter:
    """The positions that count for one config and its models. first: positions dropped per row;
    active: whether any position within them is left out; keep(tokens_nS, acts_nPMD) -> [n, P]."""

    def __init__(self, cfg, models=()):
        self.first = first_n(cfg)
        if self.first >= cfg["seq_len"]:
            raise ConfigError(f"ignore_first_n={self.first} leaves no position of seq_len={cfg['seq_len']}")
        tokenizer = next((m.tokenizer for m in models if getattr(m, "tokenizer", None) is not None), None)
        self.exclude_ids = excluded_ids(cfg, tokenizer)
        self.outlier_multiple = float(cfg.get("outlier_norm_multiple") or 0.0)
        self.active = bool(len(self.exclude_ids)) or self.outlier_multiple > 0

    def keep(self, tokens_nS, acts_nPMD):
        return keep_mask(tokens_nS[:, self.first:], acts_nPMD, self.exclude_ids, self.outlier_multiple)
