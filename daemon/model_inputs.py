"""What the scheduler is told about a model and a request, from the store's record, its GGUF
metadata and the request's typed options. Pure: no I/O, no clock (the supervisor reads the
files and calls these).

* :func:`model_key`: the scheduler's key of a model (its GGUF, plus its projector's);
  :func:`key_paths` splits one.
* :func:`facts_from_info` / :func:`projector_facts`: ``ModelFacts`` for the estimate.
* :func:`image_tokens`: the context positions one image takes, from the projector's metadata.
* :func:`runner_options`: the load options (``RunnerOptions``) from a ``RequestOptions``.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from corral.daemon import gguf_info
from corral.daemon.params import RequestOptions
from corral.scheduler import ModelFacts, RunnerOptions
from corral.scheduler.estimate import projector_graph


class ModelLike(Protocol):
    """What acquire() needs of a model (``store.ModelRecord`` has all of it)."""

    @property
    def name(self) -> str: ...
    @property
    def digest(self) -> str: ...
    @property
    def model_path(self) -> Any: ...


_PROJECTOR = "\n+projector "


def model_key(model: ModelLike) -> str:
    """The scheduler's key of a model: its GGUF path, plus its vision projector's when it has
    one (the same GGUF with and without a projector are different runners)."""
    projectors = getattr(model, "projectors", None) or ()
    return str(model.model_path) + (f"{_PROJECTOR}{projectors[0]}" if projectors else "")


def key_paths(key: str) -> tuple[str, str | None]:
    """(model path, projector path or None) of a :func:`model_key`."""
    path, _, projector = key.partition(_PROJECTOR)
    return path, projector or None


def _vision_num(projector: gguf_info.GGUFInfo, key: str) -> int:
    value = projector.metadata.get(f"clip.vision.{key}")
    return int(value) if isinstance(value, (int, float)) else 0


# Ollama's count for every image of a chat it truncates (server/prompt.go chatPrompt)
OLLAMA_IMAGE_TOKENS = 768


def image_tokens(projector: gguf_info.GGUFInfo) -> int:
    """The context positions (KV cells) one image takes, as far as the projector's metadata
    tells without an image (llama.cpp's clip_n_output_tokens for projectors that resize every
    image to image_size first):

    * LLaVA ``mlp`` / ``mlp_norm`` without tiles (no ``image_grid_pinpoints``): one embedding
      per patch, (image_size / patch_size)^2;
    * Gemma 3 (``gemma3``): the patch grid average-pooled by the scale factor on each side
      (``clip.vision.projector.scale_factor``, default 4): (896 / 14)^2 / 16 = 256 for every
      Gemma 3 size.

    Any other projector (tiles, or a count that depends on the image's size): Ollama's fixed
    768."""
    meta = projector.metadata
    size, patch = _vision_num(projector, "image_size"), _vision_num(projector, "patch_size")
    kind = meta.get("clip.projector_type")
    if size <= 0 or patch <= 0:
        return OLLAMA_IMAGE_TOKENS
    if kind in ("mlp", "mlp_norm") and "clip.vision.image_grid_pinpoints" not in meta:
        return (size // patch) ** 2
    if kind == "gemma3":
        merge = _vision_num(projector, "projector.scale_factor") or 4
        return ((size // patch) // merge) ** 2
    return OLLAMA_IMAGE_TOKENS


def projector_facts(facts: ModelFacts, projector: gguf_info.GGUFInfo) -> ModelFacts:
    """``facts`` with a vision projector: its tensor bytes and its encoder's compute buffer."""
    graph = projector_graph(
        *(
            _vision_num(projector, k)
            for k in ("image_size", "patch_size", "embedding_length", "attention.head_count")
        )
    )
    return msgspec.structs.replace(
        facts, has_vision=True, projector_bytes=projector.tensor_bytes, projector_graph=graph
    )


def facts_from_info(info: gguf_info.GGUFInfo, file_size: int) -> ModelFacts:
    """The scheduler's ModelFacts from parsed GGUF metadata.

    ``file_size`` is never taken below the tensor table's bytes: a file shorter than its
    tensors (truncated, or a header-only test model) must not shrink the estimate of the
    weights that stay on CPU. For a well-formed file this changes nothing.
    ``output_bytes`` is the "+1" layer: output_norm and the output head, which is
    ``token_embd`` itself when the model has no ``output.weight`` (tied embeddings).
    """
    tied = not any(t.name == "output.weight" for t in info.tensors)
    return ModelFacts(
        architecture=info.architecture,
        file_size=max(file_size, info.tensor_bytes),
        block_count=info.block_count or len(info.layer_bytes),
        n_ctx_train=info.context_length or 0,
        embedding_length=info.embedding_length or 0,
        head_count=info.head_count or 0,
        head_count_kv=info.head_count_kv or info.head_count or 0,
        key_length=info.key_length or 0,
        value_length=info.value_length or 0,
        vocab_size=info.vocab_size or 0,
        sliding_window=info.sliding_window or 0,
        layer_bytes=tuple(info.layer_bytes),
        output_bytes=info.output_bytes + (info.token_embd_bytes if tied else 0),
        token_embd_bytes=info.token_embd_bytes,
        is_embedding_model=info.is_embedding,
        has_vision=info.has_vision,
    )


def runner_options(
    options: RequestOptions,
    *,
    default_ctx: tuple[int, bool],
    kv_cache_type: str = "",
    flash_attention: bool | None = None,
) -> RunnerOptions:
    """The scheduler's load options from a request's typed options (Modelfile parameters and
    request already merged and typed by ``RequestOptions.build``: nothing is checked here).

    1. ``num_ctx``: explicit value, else ``default_ctx`` = (OLLAMA_CONTEXT_LENGTH, not auto) or
       (the VRAM tier, auto), decided once at start. The floors (4; 2048 with vision) and the
       n_ctx_train clamp are the scheduler's (``estimate.effective_num_ctx``), applied to
       what it launches and compares.
    2. ``num_batch``: explicit (at least 1), else 512 marked auto.
    3. ``num_gpu`` (-1 auto), ``main_gpu``, ``use_mmap``, ``num_thread`` (negative = 0) pass
       through.
    """
    num_ctx, num_ctx_auto = (
        (options.num_ctx, False)
        if options.num_ctx is not None  # 1.
        else default_ctx
    )
    num_batch = options.num_batch  # 2.
    return RunnerOptions(
        num_ctx=num_ctx,
        num_batch=512 if num_batch is None else max(1, num_batch),
        num_gpu=-1 if options.num_gpu is None else options.num_gpu,  # 3.
        main_gpu=options.main_gpu,
        use_mmap=options.use_mmap,
        num_thread=max(0, options.num_thread or 0),
        kv_cache_type=kv_cache_type,
        flash_attention=flash_attention,
        num_ctx_auto=num_ctx_auto,
        num_batch_auto=num_batch is None,
    )
