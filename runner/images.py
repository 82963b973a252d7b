"""Images for the real engine: llama.cpp's multimodal library (libmtmd) through
``llama_cpp.mtmd_cpp``. With engine.py, kvcache.py and devices.py, the only modules importing
llama_cpp.

* :func:`decode_image` turns PNG / JPEG / WebP / BMP bytes into RGB pixels with Pillow (the
  formats Ollama's runner decodes; llama.cpp's own loader reads WebP only through ffmpeg). A
  file that is none of them, or is damaged, raises :class:`BadRequest` with Ollama's text.
* :class:`Vision` owns one mtmd context on the runner's llama_model (the projector's weights
  and its compute buffer). ``tokenize`` splits a prompt at its ``[img-N]`` markers (Ollama's
  convention: N indexes the request's images) and returns the prompt as ids where each image
  is ``n_pos`` copies of a negative id derived from the image's SHA-256, plus the image spans
  by start index. Equal images at equal places give equal ids, so the slot prompt cache
  matches them like tokens. ``encode`` runs the vision encoder on one span and keeps a copy of
  its embeddings in ``Span.embd``; encodes are serialised by a lock (mtmd's encoder is not
  thread-safe), and they may run beside a llama_decode (the encoder has its own backend
  context): the engine encodes in the submitting thread, so other sequences keep decoding.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import re
import threading
import warnings

import numpy as np
from llama_cpp import mtmd_cpp

from corral.runner.common import BadRequest, LoadError

MARKER = re.compile(r"\[img-(\d+)\]")
POISONED = -1  # a cache cell whose image was cut by a context shift: never matches a prompt
_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP"})
# Ollama's text for an image its decoders cannot read (runner: "failed to process inputs: ",
# Go's image package: "image: unknown format"), behind the completion handler's prefix.
UNKNOWN_FORMAT = "Failed to create new sequence: failed to process inputs: image: unknown format"


def decode_image(data: bytes) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of an encoded image; BadRequest when it cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the size check is below
            img = Image.open(io.BytesIO(data))
            if img.format not in _FORMATS:
                raise BadRequest(UNKNOWN_FORMAT)
            if img.width * img.height > 64 * 1024 * 1024:
                raise BadRequest(
                    "Failed to create new sequence: failed to process inputs: image is too large"
                )
            rgb = img.convert("RGB")
            return rgb.width, rgb.height, rgb.tobytes()
    except BadRequest:
        raise
    except Exception:  # Pillow's UnidentifiedImageError, truncated data, bad chunks...
        raise BadRequest(UNKNOWN_FORMAT) from None


def image_key(data: bytes) -> int:
    """The negative id of an image's cells in a prompt (< POISONED, never a token)."""
    return -2 - (int.from_bytes(hashlib.sha256(data).digest()[:8], "little") >> 2)


def span_edges(media: dict[int, Span], n: int) -> tuple[int, int]:
    """The start and end of the image whose cells ``n`` falls inside, else ``(n, n)``: an image
    is evaluated whole, so a prompt cache or a truncation may only stop at its edges."""
    for start, span in media.items():
        if start < n < start + span.n_pos:
            return start, start + span.n_pos
    return n, n


class Span:
    """One image of a prompt: ``n_pos`` cells from its start. Owns a copy of mtmd's chunk."""

    def __init__(self, chunk, key: int) -> None:
        self.chunk = chunk
        self.key = key
        self.n_tokens = int(mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk))
        self.n_pos = int(mtmd_cpp.mtmd_input_chunk_get_n_pos(chunk))
        self.embd: np.ndarray | None = None  # n_tokens x n_embd float32, once encoded

    def __del__(self) -> None:
        chunk, self.chunk = getattr(self, "chunk", None), None
        if chunk:
            mtmd_cpp.mtmd_input_chunk_free(chunk)


class Vision:
    """The runner's mtmd context. ``load`` raises LoadError; ``close`` frees it."""

    def __init__(
        self,
        projector_path: str,
        model,
        *,
        use_gpu: bool,
        n_threads: int,
        failure_text,
        log_callback,
    ) -> None:
        """``log_callback``: the engine's llama.cpp log callback, so that the projector's
        buffer sizes count in the runner's memory and its errors reach the failure text."""
        mtmd_cpp.mtmd_log_set(log_callback, ctypes.c_void_p(0))
        self._lock = threading.Lock()
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        ctx = mtmd_cpp.mtmd_init_from_file(projector_path.encode(), model, params)
        if not ctx:
            raise LoadError(failure_text("failed to load the vision projector"))
        self.ctx = ctx
        if not mtmd_cpp.mtmd_support_vision(ctx):
            self.close()
            raise LoadError("the projector has no vision encoder")
        if mtmd_cpp.mtmd_decode_use_mrope(ctx):
            # M-RoPE (Qwen2-VL family) needs 4 positions per cell; the engine keeps one.
            self.close()
            raise LoadError("projectors with M-RoPE positions are not supported")

    def close(self) -> None:
        if self.ctx:
            mtmd_cpp.mtmd_free(self.ctx)
            self.ctx = None

    # -- any thread (mtmd_tokenize only reads the context) ---------------------------------

    def tokenize(
        self, prompt: str, images: list[bytes], add_special: bool
    ) -> tuple[list[int], dict[int, Span]]:
        """Prompt ids (text tokens, image cells) and the image spans by start index."""
        pieces: list[str | int] = []
        pos = 0
        for m in MARKER.finditer(prompt):
            pieces.append(prompt[pos : m.start()])
            n = int(m.group(1))
            if n >= len(images):
                raise BadRequest(
                    f"Failed to create new sequence: failed to process inputs: "
                    f"invalid image index: {n}"
                )
            pieces.append(n)
            pos = m.end()
        pieces.append(prompt[pos:])
        keep: list[object] = []  # ctypes objects mtmd reads during the call
        parts = (mtmd_cpp.mtmd_input_part * len(pieces))()
        bitmaps = []
        keys: list[int] = []
        try:
            for i, piece in enumerate(pieces):
                if isinstance(piece, str):
                    raw = piece.encode("utf-8")
                    text = mtmd_cpp.mtmd_input_text(
                        text=raw, text_len=len(raw), add_special=False, parse_special=True
                    )
                    keep += [raw, text]
                    parts[i].text = ctypes.pointer(text)
                else:
                    w, h, rgb = decode_image(images[piece])
                    buf = (ctypes.c_uint8 * len(rgb)).from_buffer_copy(rgb)
                    bmp = mtmd_cpp.mtmd_bitmap_init(w, h, buf)
                    if not bmp:
                        raise BadRequest(UNKNOWN_FORMAT)
                    bitmaps.append(bmp)
                    keys.append(image_key(images[piece]))
                    parts[i].bitmap = bmp
            ptrs = (ctypes.POINTER(mtmd_cpp.mtmd_input_part) * len(pieces))(
                *[ctypes.pointer(parts[i]) for i in range(len(pieces))]
            )
            chunks = mtmd_cpp.mtmd_input_chunks_init()
            try:
                rc = mtmd_cpp.mtmd_tokenize_from_parts(
                    self.ctx, chunks, ptrs, len(pieces), add_special
                )
                if rc != 0:
                    raise BadRequest(
                        f"Failed to create new sequence: failed to process inputs: "
                        f"image preprocessing failed ({rc})"
                    )
                return self._walk(chunks, keys)
            finally:
                mtmd_cpp.mtmd_input_chunks_free(chunks)
        finally:
            for bmp in bitmaps:
                mtmd_cpp.mtmd_bitmap_free(bmp)

    @staticmethod
    def _walk(chunks, keys: list[int]) -> tuple[list[int], dict[int, Span]]:
        ids: list[int] = []
        spans: dict[int, Span] = {}
        k = 0
        for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
            chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
            if mtmd_cpp.mtmd_input_chunk_get_type(chunk) == mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t()
                tokens = mtmd_cpp.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                ids += tokens[: n.value]
                continue
            span = Span(mtmd_cpp.mtmd_input_chunk_copy(chunk), keys[k])
            k += 1
            spans[len(ids)] = span
            ids += [span.key] * span.n_pos
        return ids, spans

    def encode(self, span: Span, n_embd: int) -> np.ndarray:
        """Run the vision encoder once for ``span`` (blocking; any thread); its embeddings."""
        if span.embd is not None:
            return span.embd
        with self._lock:
            if span.embd is None:
                rc = mtmd_cpp.mtmd_encode_chunk(self.ctx, span.chunk)
                if rc != 0:
                    raise RuntimeError(f"image encoding failed ({rc})")
                out = mtmd_cpp.mtmd_get_output_embd(self.ctx)
                span.embd = np.ctypeslib.as_array(out, shape=(span.n_tokens * n_embd,)).copy()
            return span.embd

    def non_causal(self, span: Span) -> bool:
        """Gemma 3 style: the image's cells attend to each other both ways."""
        return bool(mtmd_cpp.mtmd_decode_use_non_causal(self.ctx, span.chunk))
