"""The repo as a reader meets it: the reference's files and the scripts a user types at the top,
everything else in the crossdiff package's folders, which import one way (LAYERS); the package
never imports the top-level files, and no library module imports a script."""
import ast
import re
import subprocess
import sys
import tomllib

from conftest import REPO

# The package's folders, lowest first: a folder imports only itself and the folders before it.
LAYERS = ("io", "config", "arch", "scale", "sources", "diffing", "pairs")
LIBRARY = {"crosscoder", "trainer", "buffer", "utils", "sweep"}  # the top-level modules code imports
SCRIPTS = {"train", "analysis", "data", "store", "organism"}  # the top-level scripts a user runs (and tools/)


def module_name(path):
    return ".".join(path.relative_to(REPO).with_suffix("").parts)


def all_modules():
    """{dotted name: path} of every module: the top level, the package and tools/."""
    paths = [*REPO.glob("*.py"), *REPO.glob("crossdiff/**/*.py"), *REPO.glob("tools/*.py")]
    return {module_name(p): p for p in paths if p.name != "__init__.py"}


def imports_of(path, known):
    """The repo modules a file imports anywhere in it, function-level imports included
    (`from crossdiff.scale import distributed` names crossdiff.scale.distributed)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found & set(known) - {module_name(path)}


def graph():
    known = all_modules()
    return {m: imports_of(p, known) for m, p in known.items()}


def folder(module):
    """The package folder a module lives in, or None outside the package."""
    parts = module.split(".")
    return parts[1] if parts[0] == "crossdiff" else None


def find_cycle(g):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_top_level_holds_the_reference_s_files_and_the_scripts_and_the_package_only_folders():
    assert {p.stem for p in REPO.glob("*.py")} == LIBRARY | SCRIPTS
    assert [p.name for p in (REPO / "crossdiff").glob("*.py")] == ["__init__.py"]
    assert {p.name for p in (REPO / "crossdiff").iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS)


def test_no_import_cycles_between_any_modules_function_level_imports_included():
    g = graph()
    assert {"train", "crosscoder", "crossdiff.config.schema", "crossdiff.arch.partition", "tools.bench"} <= set(g)
    assert find_cycle(g) is None, f"import cycle: {' -> '.join(find_cycle(g))}"


def layer_violations(g):
    """Imports of a package module that go up the layers or out of the package."""
    return [f"{m} imports {d}" for m, deps in g.items() if folder(m) is not None for d in sorted(deps)
            if folder(d) is None or LAYERS.index(folder(d)) > LAYERS.index(folder(m))]


def test_the_package_s_folders_import_one_way_and_never_the_top_level_or_tools():
    assert not layer_violations(graph()), layer_violations(graph())


def test_no_library_module_imports_a_script():
    """Scripts (train.py, analysis.py, data.py, store.py, tools/) are run, not imported, by the
    library: the package and the reference's modules."""
    g = graph()
    scripts = SCRIPTS | {m for m in g if m.startswith("tools.")}
    wrong = [f"{m} imports {d}" for m, deps in g.items() if m not in scripts for d in deps & scripts]
    assert not wrong, wrong


def test_the_planted_violations_are_caught(tmp_path):
    """The checks above fail on behaviour: a package module importing a higher folder, and one
    importing a top-level module."""
    g = graph()
    assert layer_violations(dict(g, **{"crossdiff.io.checkpoint": {"crossdiff.pairs.toy"}})) == [
        "crossdiff.io.checkpoint imports crossdiff.pairs.toy"]
    assert layer_violations(dict(g, **{"crossdiff.arch.sparse": {"trainer"}})) == ["crossdiff.arch.sparse imports trainer"]
    assert not layer_violations(dict(g, **{"crossdiff.pairs.toy": {"crossdiff.io.checkpoint"}}))


def test_no_module_repeats_a_config_default_with_cfg_get():
    """Defaults live in the config table (crossdiff/config/schema.py); configs are completed once
    (complete_cfg), so no module reads cfg.get("key", default) for a config key: such a default
    would drift."""
    from crossdiff.config.schema import SCHEMA

    repeats = []
    for name, path in all_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and "cfg" in ast.unparse(node.func.value) and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in SCHEMA):
                repeats.append(f"{name}:{node.lineno} {ast.unparse(node)}")
    assert not repeats, repeats


def test_the_schemas_dtype_names_are_the_crosscoders_dtypes():
    """The config table names the dtypes without importing torch; crosscoder.py maps them."""
    from crosscoder import DTYPES
    from crossdiff.config.schema import DTYPE_NAMES

    assert set(DTYPE_NAMES) == set(DTYPES)


def venv_with(tmp_path, *install_args):
    """A venv on this Python's packages with the repo installed by pip (install_args), no deps,
    built by this Python's setuptools (requirements.txt: >= 70.1, which builds wheels without the
    wheel package; an older one is named rather than failing in bdist_wheel)."""
    import setuptools

    major, minor = (int(v) for v in setuptools.__version__.split(".")[:2])
    assert (major, minor) >= (70, 1), (f"setuptools {setuptools.__version__} cannot build the install without the "
                                       "wheel package: pip install -r requirements.txt (setuptools>=70.1)")
    venv = tmp_path / "venv"
    # (without its own pip: Python 3.11's bundled setuptools would shadow the installed one)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-build-isolation", *install_args], check=True, cwd=tmp_path)
    return python


def test_an_editable_install_imports_the_reference_s_modules_and_the_package_from_elsewhere(tmp_path):
    """`pip install -e .`: a Python started elsewhere imports CrossCoder and the package; the
    install lists exactly the library's top-level modules (no script, no generic name)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["py-modules"])
    assert listed == LIBRARY
    python = venv_with(tmp_path, "-e", str(REPO))
    probe = ("from crosscoder import CrossCoder; import crosscoder; from crossdiff.arch.partition import Partition; "
             "import crossdiff.arch.partition as p; print(crosscoder.__file__); print(p.__file__)")
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(REPO / "crosscoder.py"), str(REPO / "crossdiff" / "arch" / "partition.py")]


def test_a_plain_install_carries_the_dashboard_template_and_the_toy_pair_and_renders_a_dashboard(tmp_path):
    """`pip install .` (not editable) copies the package: the dashboard's template and the shipped
    toy pair come along as package data, and a dashboard renders from the installed copy. (From a
    copy of the repo: a build leaves build/ behind.)"""
    import shutil

    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "data", "checkpoints", "build", "*.egg-info",
                                                                "__pycache__", "tests", "docs", "wandb"))
    python = venv_with(tmp_path, str(source))
    probe = ("import sys, torch, crosscoder, crossdiff.diffing.dashboard as d, crossdiff.pairs.toy as t\n"
             "from crosscoder import CrossCoder\n"
             "assert 'site-packages' in d.__file__ and 'site-packages' in crosscoder.__file__, d.__file__\n"
             "torch.manual_seed(0)\n"
             "cc = CrossCoder({'d_in': 8, 'dict_size': 16, 'device': 'cpu'})\n"
             "page = d.write_dashboard(sys.argv[1], cc, info={'checkpoint': 'probe'})\n"
             "print(sorted(p.name for p in t.SHIPPED_DIR.glob('*/*.pt')))\n")
    out = subprocess.run([python, "-c", probe, str(tmp_path / "dashboard.html")], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["['base.pt',", "'chat.pt']"]
    page = (tmp_path / "dashboard.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "probe" in page and len(page) > 10_000


def test_the_folder_table_in_the_design_notes_is_the_code_s():
    """docs/design.md lists each package folder's imports (other folders); a folder added or an
    import changed without the table fails here, so the table a reader trusts is the code's."""
    table = {}
    for f, deps in re.findall(r"^\| `crossdiff/(\w+)/` \| [^|]* \| ([^|]*) \|$", (REPO / "docs" / "design.md").read_text(),
                              re.M):
        table[f] = set() if deps.strip().startswith("(none") else {d.strip() for d in deps.split(",")}
    code = {f: set() for f in LAYERS}
    for m, deps in graph().items():
        if folder(m) is not None:
            code[folder(m)] |= {folder(d) for d in deps if folder(d) not in (None, folder(m))}
    assert table == code
