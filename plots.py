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
    """nu_error against nu_reconstruction, one point per latent, with the region the paper's
    authors call model-specific (|nu_error| < 0.2 and |nu_reconstruction| < 0.5) drawn and the
    latents inside it marked."""
    from matplotlib.patches import Rectangle

    from diffing import NU_ERROR_MAX, NU_RECONSTRUCTION_MAX, is_model_specific

    plt, (fig, ax) = _figure()
    nu_e, nu_r = nu_error_J.cpu(), nu_reconstruction_J.cpu()
    passes = is_model_specific(nu_e, nu_r)
    ax.add_patch(Rectangle((-NU_RECONSTRUCTION_MAX, -NU_ERROR_MAX), 2 * NU_RECONSTRUCTION_MAX, 2 * NU_ERROR_MAX,
                           facecolor="tab:green", alpha=0.12, edgecolor="tab:green", lw=1,
                           label=f"model-specific: |nu_error| < {NU_ERROR_MAX}, |nu_reconstruction| < "
                                 f"{NU_RECONSTRUCTION_MAX}"))
    ax.scatter(nu_r[~passes].numpy(), nu_e[~passes].numpy(), s=10, alpha=0.6, color="tab:grey",
               label=f"outside: {int((~passes).sum())} latents")
    ax.scatter(nu_r[passes].numpy(), nu_e[passes].numpy(), s=18, color="tab:green", edgecolor="black", lw=0.4,
               label=f"inside: {int(passes.sum())} latents")
    ax.set(xlabel="nu reconstruction (Latent Decoupling)", ylabel="nu error (Complete Shrinkage)", title=title)
    ax.axhline(0, color="grey", lw=0.5), ax.axvline(0, color="grey", lw=0.5)
    ax.legend(loc="best", fontsize=8)
    return _finish(plt, fig, path)
