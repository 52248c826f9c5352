"""The command line every script shares (crossdiff/config/cli.py): values parsed to the table's types, --help from
the table, --sweep axes limited to the table's sweep column."""
import pytest

from crossdiff.config.cli import format_help, parse_overrides, parse_sweep, parse_value, split_sweep
from crossdiff.config.schema import DEFAULTS as default_cfg
from crossdiff.config.schema import SCHEMA, ConfigError


def test_overrides_are_parsed_to_each_keys_type():
    cfg, extras = parse_overrides(
        ["--l1_coeff", "1.5", "--num_tokens", "4e8", "--dict_size=32768", "--wrap_tokens", "true",
         "--device", "none", "--model_names", "a,b", "--preset", "toy", "--enc_dtype", "bf16"], default_cfg)
    assert cfg["l1_coeff"] == 1.5 and cfg["num_tokens"] == 400_000_000 and cfg["dict_size"] == 32768
    assert cfg["wrap_tokens"] is True and cfg["device"] is None and cfg["model_names"] == ["a", "b"]
    assert extras == {"preset": "toy"} and cfg["enc_dtype"] == "bf16"
    assert default_cfg["l1_coeff"] == 2.0  # the defaults are not mutated


def test_unknown_key_names_the_key_and_suggests_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'l1_coef'.*l1_coeff"):
        parse_overrides(["--l1_coef", "3"], default_cfg)


@pytest.mark.parametrize("key,text", [("batch_size", "1.5"), ("batch_size", "many"), ("lr", "fast"),
                                      ("wrap_tokens", "maybe")])
def test_value_of_the_wrong_type_names_the_key(key, text):
    with pytest.raises(ConfigError, match=f"--{key}"):
        parse_value(key, text)


def test_optional_integer_keys_parse_none_and_integers():
    assert parse_value("aux_k", "none") is None and parse_value("aux_k", "1_152") == 1152
    with pytest.raises(ConfigError, match="--k_max"):
        parse_value("k_max", "2.5")


def test_help_lists_every_key_with_its_default_and_meaning():
    text = format_help("usage", default_cfg, {"preset": "which preset"}, {"toy": {"dict_size": 1024}})
    for key, key_spec in SCHEMA.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{key} "))
        assert key_spec.doc and key_spec.doc in line
    assert "16384 (toy: 1024)" in text and "--preset" in text
    assert "--wrap_tokens            false" in text  # values as typed on the command line


def test_help_flag_is_not_a_config_key():
    cfg, extras = parse_overrides(["--dict_size", "8", "--help"], default_cfg)
    assert extras == {"help": True} and cfg["dict_size"] == 8


@pytest.mark.parametrize("spec,message", [("batch_size=1,2", "cannot vary 'batch_size'"), ("seed=1,2", "cannot vary 'seed'"),
                                          ("hook_point=blocks.1.hook_resid_pre", "cannot vary 'hook_point'"),
                                          ("model_names=a", "cannot vary 'model_names'"),
                                          ("l1_cof=1", "did you mean 'l1_coeff'"), ("lr=fast", "--lr"),
                                          ("l1_coeff", "key=v1,v2"), ("lr=1 lr=2", "twice")])
def test_refused_and_malformed_sweeps_are_errors_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep([spec])


def test_sweep_words_are_taken_up_to_the_next_flag():
    assert split_sweep(["--preset", "toy", "--sweep", "architecture=l1,batchtopk", "k=32", "--lr", "1"]) == \
        (["--preset", "toy", "--lr", "1"], ["architecture=l1,batchtopk", "k=32"])
    assert split_sweep(["--sweep=l1_coeff=1,2"]) == ([], ["l1_coeff=1,2"])
    assert split_sweep(["--lr", "1"]) == (["--lr", "1"], None)


def test_layer_is_the_residual_hook_entering_that_block_and_a_layer_beyond_the_model_is_refused():
    from types import SimpleNamespace

    from crossdiff.config.cli import build_cfg
    from crossdiff.config.plan import check_against_model

    cfg, _ = build_cfg(["--layer", "9", "--d_in", "640"])
    assert cfg["hook_point"] == "blocks.9.hook_resid_pre"
    assert build_cfg(["--layer", "9", "--hook_point", "blocks.9.hook_resid_pre"])[0]["hook_point"] == cfg["hook_point"]
    with pytest.raises(ConfigError, match="--layer 9 means --hook_point blocks.9.hook_resid_pre"):
        build_cfg(["--layer", "9", "--hook_point", "blocks.3.hook_resid_pre"])
    with pytest.raises(ConfigError, match="--layer takes a block index"):
        build_cfg(["--layer", "-1"])
    gemma3_270m = SimpleNamespace(n_layers=18, d_model=640, n_ctx=32768)  # TransformerLens's config fields
    check_against_model(cfg, gemma3_270m)
    check_against_model(build_cfg(["--layer", "18", "--d_in", "640"])[0], gemma3_270m)  # the last block's output
    with pytest.raises(ConfigError, match=r"beyond the model: it has 18 layers \(--layer 0 to 18\)"):
        check_against_model(build_cfg(["--layer", "19", "--d_in", "640"])[0], gemma3_270m)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "toy", "--dataset", "/does/not/exist.pt"], "the toy preset trains on its own pair's text"),
    (["--sweep", "l1_coeff=1,2", "--sweep", "lr=1e-4,1e-3"], "--sweep is given twice"),
    (["--l1_coeff", "1", "--l1_coeff", "2"], r"--l1_coeff is given twice \('1', then '2'\)"),
    (["--preset", "toy", "--preset", "gemma"], "--preset is given twice"),
])
def test_a_value_that_would_be_ignored_or_overwritten_is_refused(argv, message):
    """What the command line would drop silently is an error naming it: a dataset the toy preset
    never reads, a second --sweep (it replaced the first), a key or flag given twice."""
    from crossdiff.config.cli import build_cfg

    with pytest.raises(ConfigError, match=message):
        build_cfg(argv)
