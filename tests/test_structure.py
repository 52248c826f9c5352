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


def test_no_module_imports_the_training_script():
    """train.py is the script a user edits and runs; the defaults, the CLI and the loaders are the
    library's (config.py, cli.py, utils.py), so no other module imports it."""
    graph = {p.stem: repo_imports(p) for p in REPO.glob("*.py")}
    assert not [m for m, deps in graph.items() if "train" in deps]


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


def test_an_editable_install_imports_the_modules_from_outside_the_repo(tmp_path):
    """`pip install -e .` (pyproject.toml): a Python started elsewhere imports CrossCoder, and
    every module the repo has is one the install lists (a new module is not left out)."""
    import subprocess
    import sys
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    assert listed == MODULES
    venv = tmp_path / "venv"
    # (without its own pip: Python 3.11's bundled setuptools would shadow the installed one)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", "-e", str(REPO)], check=True, cwd=tmp_path)
    out = subprocess.run([python, "-c", "from crosscoder import CrossCoder; import crosscoder; print(crosscoder.__file__)"],
                         cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(REPO / "crosscoder.py")


def test_the_import_graph_in_the_design_notes_is_the_code_s():
    """docs/design.md lists each module's imports; a module added or an import changed without the
    table fails here, so the table a reader trusts is the code's."""
    import re

    table = {}
    for m, deps in re.findall(r"^\| `(\w+)` \| ([^|]*) \|$", (REPO / "docs" / "design.md").read_text(), re.M):
        table[m] = set() if deps.startswith("(none") else {d.strip() for d in deps.split(",")}
    assert table == {p.stem: repo_imports(p) for p in REPO.glob("*.py")}
