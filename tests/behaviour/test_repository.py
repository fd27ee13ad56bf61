"""The tree shows the design: the scripts at the top, one package beneath them, found one way
(pyproject.toml), and its torch-free layers free of torch."""
from __future__ import annotations

import ast
import subprocess
import sys

from helpers import ROOT

TOP_LEVEL = {"train.py", "plot.py", "densenet.py", "densenet_trainer", "attic", "bench", "tests",
             "docs", ".ci", "pyproject.toml", "requirements.txt", "README.md", ".gitignore"}
TORCH_FREE = ["densenet_trainer.settings.config", "densenet_trainer.settings.cli",
              "densenet_trainer.settings.architecture", "densenet_trainer.records.results",
              "densenet_trainer.records.table_formats",
              "densenet_trainer.records.layout"]
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
