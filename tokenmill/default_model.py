"""tokenmill's own model pair, shipped in the repository's models/ folder (recipe: docs/default_model.md).

With no --model, the command line uses the default model; with `--speculative-method draft` and no
--draft-model, it uses the default model's distilled draft.
"""

from __future__ import annotations

from pathlib import Path

from tokenmill.config import DRAFT_MODEL_METHODS
from tokenmill.errors import ModelLoadError

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL_NAME = "tokenmill-py-13m"
DEFAULT_MODEL = MODELS_DIR / DEFAULT_MODEL_NAME
DEFAULT_DRAFT = MODELS_DIR / f"{DEFAULT_MODEL_NAME}-draft"


def served_name(model: str | None) -> str:
    """The model name clients see and send: the checkpoint folder's (or file's) name, never its full path,
    which would tell every client how the server's disk is laid out."""
    if not model:
        return DEFAULT_MODEL_NAME
    name = Path(model.rstrip("/\\")).name
    return Path(name).stem if name.endswith(".gguf") else name or DEFAULT_MODEL_NAME


def default_model_path() -> str:
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise ModelLoadError(
            f"no --model given and the default model is not at {DEFAULT_MODEL}: it ships in the models/ folder "
            "of a tokenmill clone (an installed wheel does not carry it); pass --model PATH"
        )
    return str(DEFAULT_MODEL)


def resolve_models(model: str | None, method: str | None, draft_model: str | None) -> tuple[str, str | None]:
    """(target, draft) paths: the default pair fills in whatever was not given."""
    target = model or default_model_path()
    if method in DRAFT_MODEL_METHODS and draft_model is None and Path(target).resolve() == DEFAULT_MODEL.resolve():
        draft_model = str(DEFAULT_DRAFT)
    return target, draft_model
