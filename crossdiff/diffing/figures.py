"""What the analysis shows a reader: the figures (each plot_* saves a PNG when given a path,
returned, and shows the figure inside a notebook), an HTML page of top activating contexts, and
one readable line of a Latent Scaling summary.

Shape legend: N sequences, F latents, J selected latents.
"""
import html

import torch

from crossdiff.config.cli import in_notebook
from crossdiff.diffing.measures import NU_ERROR_MAX, NU_RECONSTRUCTION_MAX, is_model_specific


def examples_html(str_tokens_fn, tokens_NS, latents_J, values, seqs, positions, window=12, title=""):
    """An HTML page: for each latent, its top contexts with the activating token highlighted."""
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>",
             f"<h2>{html.escape(title)}</h2>"]
    for j, latent in enumerate(latents_J):
        parts.append(f"<h3>latent {int(latent)}</h3><ol>")
        for v, n, p in zip(values[j].tolist(), seqs[j].tolist(), positions[j].tolist()):
            if v <= 0:
                continue
            words = str_tokens_fn(tokens_NS[n, max(0, p - window) : p + 1])
            ctx = "".join(html.escape(w) + " " for w in words[:-1])
            parts.append(f"<li>{v:.2f}: {ctx}<b style='background:#fd8'>{html.escape(words[-1])}</b></li>")
        parts.append("</ol>")
    return "\n".join(parts + ["</body></html>"])


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


def plot_norm_share_histogram(share_FM, path=None, title="Each model's share of the decoder norm", names=None):
    """For more than two models, the relative norm's figure per model: each latent's share of its
    decoder norm in that model (0: absent there, 1: that model's alone), one line per model."""
    plt, (fig, ax) = _figure()
    share = share_FM[torch.isfinite(share_FM).all(-1)].cpu()
    for m in range(share.shape[1]):
        ax.hist(share[:, m].numpy(), bins=100, range=(0, 1), histtype="step", lw=1.5,
                label=f"model {m}" + (f" ({names[m]})" if names else ""))
    ax.axvline(1 / share.shape[1], color="grey", ls=":", lw=1, label="an even split")
    ax.set(xlabel="share of the decoder norm  |d_m| / sum over models |d_m'|", ylabel="latents", title=title)
    ax.legend(fontsize=8)
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


def format_scaling(s):
    """One readable line of a scaling_summary."""
    specific = next(v for k, v in s.items() if k.startswith("specific"))
    medians = (f"median nu_error {s['median_nu_error']:.2f}, nu_reconstruction {s['median_nu_reconstruction']:.2f}"
               if s["median_nu_error"] is not None else "no finite ratios")
    return (f"{s['latents']} latents ({s['finite']} with finite ratios): {specific} pass |nu_error| < {NU_ERROR_MAX} "
            f"and |nu_reconstruction| < {NU_RECONSTRUCTION_MAX}; {medians}; most specific by rank sum: "
            f"{s['most_specific_by_rank_sum']}")
