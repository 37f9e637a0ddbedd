"""The layering of ARCHITECTURE.md, read from the import graph: imports go down the list, never up.

Every `import` in a module counts, including those inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tokenmill"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = PACKAGE.parent, packages: tuple[str, ...] = ("tokenmill",)) -> set[str]:
    """Absolute names of the modules of `packages` (and torch, numpy) a file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in packages + ("torch", "numpy")}


def _files(*packages: str) -> list[Path]:
    files: list[Path] = []
    for package in packages:
        target = PACKAGE / package
        files.extend(sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")])
    return files


def _violations(files: list[Path], forbidden: tuple[str, ...], root: Path = PACKAGE.parent) -> list[str]:
    found = []
    for path in files:
        for name in sorted(_imports(path, root)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(root)} imports {name}")
    return found


ABOVE_MODEL_CODE = ("tokenmill.worker", "tokenmill.engine", "tokenmill.server", "tokenmill.spec_decode",
                    "tokenmill.structured", "tokenmill.sample", "tokenmill.bench", "tokenmill.llm", "tokenmill.cli",
                    "tokenmill.engine_args")


def test_core_imports_only_core_and_plain_data_modules() -> None:
    allowed = ("tokenmill.core", "tokenmill.sampling_params", "tokenmill.errors", "tokenmill.structured.params")
    found = []
    for path in _files("core"):
        for name in sorted(_imports(path)):
            top = name.split(".")[0]
            if top in ("torch", "numpy") or (top == "tokenmill" and name != "tokenmill"
                                                and not any(name == a or name.startswith(a + ".") for a in allowed)):
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert found == []


def test_core_loads_without_torch() -> None:
    code = "import sys, tokenmill.core.scheduler, tokenmill.core.kv_manager; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=PACKAGE.parent)


@pytest.mark.parametrize("package", ["models", "layers", "attention", "kernels", "lora"])
def test_model_code_knows_nothing_of_worker_engine_or_server(package: str) -> None:
    assert _violations(_files(package), ABOVE_MODEL_CODE) == []


def test_lora_sits_above_the_model_code_it_hooks_into() -> None:
    """Layers hold a LoRA only through LinearBase.lora (a protocol); the lora package imports them, not back."""
    assert _violations(_files("models", "layers", "attention", "kernels"), ("tokenmill.lora",)) == []


def test_sample_sits_below_worker_and_spec_decode() -> None:
    forbidden = ("tokenmill.worker", "tokenmill.spec_decode", "tokenmill.engine", "tokenmill.server",
                 "tokenmill.structured.backend", "tokenmill.llm", "tokenmill.cli")
    assert _violations(_files("sample"), forbidden) == []


def test_worker_imports_neither_spec_decode_nor_structured_nor_server() -> None:
    forbidden = ("tokenmill.spec_decode", "tokenmill.structured", "tokenmill.server", "tokenmill.engine",
                 "tokenmill.llm", "tokenmill.cli")
    assert _violations(_files("worker"), forbidden) == []


def test_nothing_in_the_engine_imports_the_server() -> None:
    engine_files = [p for p in PACKAGE.rglob("*.py")
                    if "server" not in p.relative_to(PACKAGE).parts and p.name != "cli.py"]
    assert _violations(engine_files, ("tokenmill.server",)) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """The rules above can fail: a function-local import and a relative one are both found."""
    fake = tmp_path / "tokenmill" / "worker" / "_layering_probe.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from tokenmill.spec_decode import speculator\n\nfrom ..server import app\n")
    found = _violations([fake], ("tokenmill.spec_decode", "tokenmill.server"), root=tmp_path)
    assert found == ["tokenmill/worker/_layering_probe.py imports tokenmill.server",
                     "tokenmill/worker/_layering_probe.py imports tokenmill.server.app",
                     "tokenmill/worker/_layering_probe.py imports tokenmill.spec_decode",
                     "tokenmill/worker/_layering_probe.py imports tokenmill.spec_decode.speculator"]


RESEARCH = PACKAGE.parent / "tokenmill_research"
# What starting a local server takes; the rest of the package talks HTTP to an OpenAI-compatible endpoint
# (the web page's server also answers errors in the server's shape, from tokenmill.server.errors).
RESEARCH_LOCAL_SERVER_IMPORTS = ("tokenmill.engine.async_engine", "tokenmill.llm", "tokenmill.model_catalog",
                                 "tokenmill.server.app", "tokenmill.server.http_protocol")


def test_the_research_package_uses_the_engine_only_to_start_a_local_server() -> None:
    found = []
    for path in sorted(RESEARCH.rglob("*.py")):
        allowed = ("tokenmill.errors",) + (RESEARCH_LOCAL_SERVER_IMPORTS if path.name == "local_server.py" else ()) \
            + (("tokenmill.server.errors",) if path.relative_to(RESEARCH).as_posix() == "web/app.py" else ())
        for name in sorted(_imports(path)):
            if name.startswith("tokenmill") and name not in allowed and not any(
                    name.startswith(a + ".") for a in allowed) and name != "tokenmill.errors.TokenmillError":
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert found == []


def test_only_the_command_line_knows_the_research_package() -> None:
    found = [f"{p.relative_to(PACKAGE.parent)} imports {name}" for p in sorted(PACKAGE.rglob("*.py"))
             for name in sorted(_imports(p, packages=("tokenmill_research",)))
             if name.startswith("tokenmill_research") and p.name != "cli.py"]
    assert found == []
    cli_imports = _imports(PACKAGE / "cli.py", packages=("tokenmill_research",))
    assert "tokenmill_research" in cli_imports  # the check above sees the research package's imports
