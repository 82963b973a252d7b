"""Shared fixtures: model files for tests (nothing is downloaded).

* ``tiny_gguf``: path of a tiny random-weight llama GGUF (seed 0), written once per session.
  Other seeds: ``tiny_gguf_factory(seed)``. ``tiny_projector``: a tiny vision projector for it.
* ``gemma_gguf``: path of Gemma 3 270M (Q4_K_M), assembled from the registry package once and
  cached across runs in ~/.cache/corral/models.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.gemma import gemma_path
from tests.fixtures.tiny_gguf import write_tiny_llama
from tests.fixtures.tiny_vision import write_tiny_projector


@pytest.fixture(scope="session")
def tiny_gguf_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    made: dict[int, Path] = {}

    def make(seed: int = 0) -> Path:
        if seed not in made:
            made[seed] = write_tiny_llama(
                tmp_path_factory.mktemp("tiny") / f"tiny-{seed}.gguf", seed
            )
        return made[seed]

    return make


@pytest.fixture(scope="session")
def tiny_gguf(tiny_gguf_factory: Callable[[int], Path]) -> Path:
    return tiny_gguf_factory(0)


@pytest.fixture(scope="session")
def tiny_projector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny vision projector (LLaVA ``mlp``) that pairs with ``tiny_gguf``."""
    return write_tiny_projector(tmp_path_factory.mktemp("vision") / "mmproj.gguf", 0)


@pytest.fixture(scope="session")
def gemma_gguf() -> Path:
    return gemma_path()
