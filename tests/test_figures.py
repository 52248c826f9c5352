"""The analysis' figures (crossdiff/diffing/figures.py): what each one's axes hold before it is saved."""
import matplotlib.image
import numpy as np
import torch

from crossdiff.diffing import figures


def drawn(monkeypatch):
    """Records what each figure's axes hold just before it is saved and closed."""
    seen = {}
    finish = figures._finish

    def spy(plt, fig, path):
        ax = fig.axes[0]
        seen["heights"] = np.array([p.get_height() for p in ax.patches])
        seen["points"] = ax.collections[0].get_offsets() if ax.collections else None
        return finish(plt, fig, path)

    monkeypatch.setattr(figures, "_finish", spy)
    return seen


def test_relative_norm_histogram_counts_each_finite_latent_once_and_saves_a_png(monkeypatch, tmp_path):
    """A latent with zero decoders (NaN relative norm) is left out; the bars equal numpy's histogram."""
    seen = drawn(monkeypatch)
    rel = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    rel[:7] = float("nan")
    path = figures.plot_relative_norm_histogram(rel, tmp_path / "h.png")
    want, _ = np.histogram(rel[7:].numpy(), bins=200, range=(0, 1))
    assert np.array_equal(seen["heights"], want) and seen["heights"].sum() == 993
    assert matplotlib.image.imread(path).shape[:2] == (480, 840)  # 7x4 inches at 120 dpi


def test_cosine_histogram_bins_span_minus_one_to_one(monkeypatch, tmp_path):
    seen = drawn(monkeypatch)
    cos = torch.linspace(-1, 1, 301)
    figures.plot_cosine_histogram(cos, tmp_path / "c.png")
    assert np.array_equal(seen["heights"], np.histogram(cos.numpy(), bins=100, range=(-1, 1))[0])


def test_latent_scaling_scatter_draws_the_pass_region_and_marks_the_latents_inside_it(monkeypatch):
    """Reconstruction on x, error on y; the region |nu_error| < 0.2, |nu_reconstruction| < 0.5 is
    drawn, and the latents inside it (here the first and the last) are a series of their own,
    counted in the legend."""
    seen = {}
    finish = figures._finish

    def spy(plt, fig, path):
        ax = fig.axes[0]
        seen["series"] = [c.get_offsets() for c in ax.collections]
        seen["region"] = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
        seen["legend"] = [t.get_text() for t in ax.get_legend().get_texts()]
        return finish(plt, fig, path)

    monkeypatch.setattr(figures, "_finish", spy)
    nu_err, nu_rec = torch.tensor([0.1, 0.9, 0.5, -0.15]), torch.tensor([0.2, 0.3, 0.8, -0.4])
    assert figures.plot_latent_scaling(nu_err, nu_rec) is None  # no path: nothing written
    outside, inside = seen["series"]
    assert np.allclose(inside, [[0.2, 0.1], [-0.4, -0.15]]) and np.allclose(outside, [[0.3, 0.9], [0.8, 0.5]])
    assert np.allclose(seen["region"], [(-0.5, -0.2, 1.0, 0.4)])
    assert any("inside: 2 latents" in t for t in seen["legend"]) and any("outside: 2" in t for t in seen["legend"])
