"""The analysis figures: relative decoder norm and cosine histograms, Latent Scaling scatter.

Each plot_* function saves a PNG when given a path (returned) and shows the figure inside a notebook.
"""
import torch

from utils import in_notebook


def _figure():
    import matplotlib

    if not in_notebook():
        matplotlib.use("Agg")  # scripts and CI have no display
    import matplotlib.pyplot as plt

    return plt, plt.subplots(figsize=(7, 4))


def _finish(plt, fig, path):
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    if in_notebook():
        plt.show()
    plt.close(fig)
    return path


def plot_relative_norm_histogram(rel_norm_F, path=None, title="Base vs chat model diff"):
    """The reference's figure: relative decoder norm per latent, 200 bins, ticks at quarters."""
    plt, (fig, ax) = _figure()
    rel = rel_norm_F[torch.isfinite(rel_norm_F)].cpu().numpy()
    ax.hist(rel, bins=200, range=(0, 1))
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_xticklabels(["0 (base only)", "0.25", "0.5", "0.75", "1 (chat only)"])
    ax.set(xlabel="relative decoder norm  |d_chat| / (|d_base| + |d_chat|)", ylabel="latents", title=title)
    return _finish(plt, fig, path)


def plot_cosine_histogram(cos_F, path=None, title="Cosine similarity of shared latents' decoders"):
    plt, (fig, ax) = _figure()
    ax.hist(cos_F.cpu().numpy(), bins=100, range=(-1, 1), log=True)
    ax.set(xlabel="cosine(d_base, d_chat)", ylabel="latents (log scale)", title=title)
    return _finish(plt, fig, path)


def plot_latent_scaling(nu_error_J, nu_reconstruction_J, path=None, title="Latent Scaling of chat-only latents"):
    plt, (fig, ax) = _figure()
    ax.scatter(nu_reconstruction_J.cpu().numpy(), nu_error_J.cpu().numpy(), s=8, alpha=0.6)
    ax.set(xlabel="nu reconstruction (Latent Decoupling)", ylabel="nu error (Complete Shrinkage)", title=title)
    ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
    return _finish(plt, fig, path)
