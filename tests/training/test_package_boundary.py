"""The training package sits beside the engine: the engine never imports it except to register its commands."""

from __future__ import annotations

import ast
import sys
import tomllib
from pathlib import Path

import pytest

import tokenmill
from tokenmill import cli

ENGINE_ROOT = Path(tokenmill.__file__).parent
REPO_ROOT = ENGINE_ROOT.parent


def _training_imports(tree: ast.AST) -> list[tuple[int, bool]]:
    """(line, at module level) of every import of tokenmill_train in a module."""
    found: list[tuple[int, bool]] = []
    top_level = {id(node) for node in getattr(tree, "body", [])}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        if any(n == "tokenmill_train" or n.startswith("tokenmill_train.") for n in names):
            found.append((node.lineno, id(node) in top_level))
    return found


def test_only_the_cli_imports_the_training_package_and_only_lazily():
    offenders: list[str] = []
    for path in sorted(ENGINE_ROOT.rglob("*.py")):
        for line, top_level in _training_imports(ast.parse(path.read_text(), str(path))):
            if path.name != "cli.py" or path.parent != ENGINE_ROOT or top_level:
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{line}")
    assert not offenders, f"the engine package imports tokenmill_train: {offenders}"


def test_pyproject_ships_the_training_package_with_its_extra():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    from setuptools import find_packages

    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(REPO_ROOT), include=include)
    assert "tokenmill_train" in packages and "tokenmill" in packages
    assert "train" in project["project"]["optional-dependencies"]


def test_without_the_training_package_train_explains_and_the_rest_works(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokenmill_train", None)  # makes `import tokenmill_train` fail
    assert cli.main(["train", "--data", "corpus", "--out", "ckpt"]) == 2
    assert cli.main(["distill", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.count("tokenmill_train") == 2 and "tokenmill[train]" in err
    assert cli.build_parser().parse_args(["make-tiny", "out"]).command == "make-tiny"


def test_with_the_training_package_its_commands_are_registered():
    args = cli.build_parser().parse_args(["train", "--data", "corpus", "--out", "ckpt", "--max-steps", "3"])
    assert args.data == ["corpus"] and args.max_steps == 3
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["distill", "--data", "corpus", "--out", "ckpt"])  # --target is required
