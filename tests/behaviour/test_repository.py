"""The tree shows the design: the scripts at the top, one package beneath them, found one way
(pyproject.toml), and its torch-free layers free of torch."""
from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from helpers import ROOT

TOP_LEVEL = {"train.py", "plot.py", "densenet.py", "densenet_trainer", "attic", "bench", "tests",
             "docs", ".ci", "pyproject.toml", "requirements.txt", "README.md", ".gitignore"}
TORCH_FREE = ["densenet_trainer.config.run_config", "densenet_trainer.config.cli",
              "densenet_trainer.config.architecture", "densenet_trainer.results.groups",
              "densenet_trainer.results.table_formats",
              "densenet_trainer.results.layout"]
MODULE_LINES = 360  # a module longer than this holds more than one job


def tracked() -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.split()


def test_the_top_level_holds_only_the_scripts_and_their_companions():
    files = tracked()
    if not files:  # not a git checkout (an exported tree): nothing to compare
        return
    assert {path.split("/")[0] for path in files} <= TOP_LEVEL


def test_no_script_or_test_edits_sys_path():
    """The package is found through pyproject.toml (installed editable; pytest's pythonpath),
    not by path edits in each script."""
    for path in [*ROOT.glob("*.py"), *ROOT.glob("attic/*.py"), *ROOT.glob("bench/*.py"),
                 *ROOT.glob("tests/**/*.py"), *ROOT.glob("densenet_trainer/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "sys"), path


def test_the_torch_free_layers_import_no_torch():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_every_module_of_the_package_is_one_room():
    """Each module of the package does one job: none runs past MODULE_LINES lines, and each
    says its job in its first docstring."""
    for path in ROOT.glob("densenet_trainer/**/*.py"):
        text = path.read_text()
        assert len(text.splitlines()) <= MODULE_LINES, f"{path} has {len(text.splitlines())} lines"
        assert ast.get_docstring(ast.parse(text)), f"{path} says nothing of its job"


def test_the_plain_path_never_imports_the_speed_machinery():
    """Only run/build.py (which puts it on a run) reaches into speed/; the model, the data,
    the loop, the files and the results can be read without it."""
    allowed = {"densenet_trainer/run/build.py"}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("densenet_trainer/**/*.py")]:
        name = path.relative_to(ROOT).as_posix()
        if name.startswith("densenet_trainer/speed/") or name in allowed:
            continue
        assert not any(target.startswith("densenet_trainer.speed") for target in imports(path)), name


@pytest.mark.slow
def test_importing_the_model_imports_no_kernel_and_no_triton():
    code = ("import sys, densenet\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'"
            " or m.startswith('densenet_trainer.') and not m.startswith('densenet_trainer.config')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def imports(path) -> set[str]:
    """Every module ``path`` imports (lazy and TYPE_CHECKING ones too), as dotted names with
    each imported name appended (``from a import b`` gives ``a.b``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_no_module_of_the_project_imports_itself_back():
    """No circle in the import graph of the scripts and the package."""
    modules = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("densenet_trainer/**/*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def known(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name
    edges = {module: {known(t) for t in imports(path)} - {"", module} for module, path in modules.items()}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for following in edges[start] - seen:
            seen.add(following)
            if following == goal or reaches(following, goal, seen):
                return True
        return False
    assert [module for module in modules if reaches(module, module, set())] == []


def test_each_room_imports_only_the_rooms_below_it_in_the_design_pages_table():
    """docs/design.md's layout table lists the package's rooms top to bottom; a module may
    import its own room and the rooms below, never one above (nor a script)."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    order = [line.split("`")[1].removesuffix("/").removesuffix(".py") for line in table.splitlines()
             if line.startswith("| `")]
    rooms = order[order.index("densenet") + 1:]
    package = ROOT / "densenet_trainer"
    assert sorted(rooms) == sorted(p.stem for p in package.iterdir()
                                   if p.suffix == ".py" and p.stem != "__init__" or p.is_dir() and p.name != "__pycache__")
    for path in package.glob("**/*.py"):
        room = path.relative_to(package).parts[0].removesuffix(".py")
        if room == "__init__":
            continue
        for target in imports(path):
            parts = target.split(".")
            if parts[0] in ("train", "plot"):
                raise AssertionError(f"{path} imports a script")
            if parts[0] == "densenet_trainer" and len(parts) > 1 and parts[1] in rooms:
                assert rooms.index(parts[1]) >= rooms.index(room), f"{path} imports {target}, a room above it"


def test_the_design_pages_change_table_names_what_exists():
    """docs/design.md's "to change X, open Y": every file it names exists and holds every
    name in its row (a function, a class, a constant, or Class.method)."""
    text = (ROOT / "docs" / "design.md").read_text()
    table = text.split("## To change X, open Y", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) >= 15
    for _, place, names in rows:
        path = ROOT / place.strip().strip("`")
        assert path.is_file(), place
        tree = ast.parse(path.read_text())
        defined = {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined.update({target.id: node for node in tree.body if isinstance(node, ast.Assign)
                        for target in node.targets if isinstance(target, ast.Name)})
        for name in names.replace("`", "").split(","):
            owner, _, member = name.strip().partition(".")
            assert owner in defined, f"{place}: {owner}"
            if member:
                methods = {node.name for node in defined[owner].body if isinstance(node, ast.FunctionDef)}
                assert member in methods, f"{place}: {name.strip()}"
