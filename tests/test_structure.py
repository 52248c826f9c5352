"""The repo's modules as a reader meets them: a flat set of files whose imports form no cycle."""
import ast

from conftest import REPO

MODULES = {p.stem for p in REPO.glob("*.py")}


def repo_imports(path):
    """The repo modules a file imports anywhere in it, function-level imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & MODULES - {path.stem}


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_between_the_repos_modules_function_level_imports_included():
    graph = {p.stem: repo_imports(p) for p in REPO.glob("*.py")}
    assert {"train", "trainer", "crosscoder", "buffer", "analysis", "utils", "config", "diffing"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_names_that_moved_still_import_from_their_old_modules():
    """Notebooks written before the split keep working: each moved name is the same object."""
    import activations
    import buffer
    import config
    import crosscoder
    import diffing
    import objective
    import trainer
    import utils

    moved = {utils: (diffing, ["latent_scaling", "splice_in_loss", "reconstruction_stats", "top_activating_examples",
                               "examples_html", "iter_paired_activations", "GENUINE_NU_MAX"]),
             crosscoder: (diffing, ["classify_latents", "BASE_ONLY_MAX", "CHAT_ONLY_MIN", "SHARED_RANGE"]),
             trainer: (objective, ["lr_multiplier", "l1_coeff_at"]),
             buffer: (activations, ["extract_activations", "autocast_context", "check_models", "run_models",
                                    "estimate_norm_factors"])}
    for old, (new, names) in moved.items():
        for name in names:
            assert getattr(old, name) is getattr(new, name), f"{old.__name__}.{name}"
    assert buffer.hook_layer is config.hook_layer


def test_no_module_repeats_a_config_default_with_cfg_get():
    """Defaults live in config.DEFAULTS; configs are completed once (config.complete_cfg), so no
    module reads cfg.get("key", default) for a config key: such a default would drift."""
    from config import SCHEMA

    repeats = []
    for path in REPO.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and "cfg" in ast.unparse(node.func.value) and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in SCHEMA):
                repeats.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not repeats, repeats


def test_the_schemas_dtype_names_are_the_crosscoders_dtypes():
    """config.py names the dtypes without importing torch; crosscoder.py maps them."""
    from config import DTYPE_NAMES
    from crosscoder import DTYPES

    assert set(DTYPE_NAMES) == set(DTYPES)
