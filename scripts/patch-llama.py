"""Source edits applied to the llama-cpp-python sdist before scripts/install-llama.sh builds it.

    python scripts/patch-llama.py SDIST_DIR

Each edit replaces one exact text; an edit whose result is already there is skipped; an edit
whose text is missing fails the install (a silent skip would silently lose the speed-up), so a
new llama-cpp-python version needs this file checked. Changing this file changes the wheel
cache key.

1. llamafile sgemm (tinyBLAS) Q8_0 x Q8_0 on x86 only from 8 columns on. Below that ggml's
   own vec_dot path is faster: Gemma 3 270M's 640 x 262144 Q8_0 output projection on one Zen 5
   core costs ~7.5 ms per column through vec_dot but ~18 ms (2 columns) and ~13 ms (4) per
   column through tinyBLAS (k = 20 blocks per row is too short to amortise its tile overhead).
   A whole 4-sequence decode step: 66 -> 45 ms on 1 thread, ~34-51 -> ~28-44 ms on 2 threads
   (bench/runner.py). At 8 columns the two are even on 1 thread and tinyBLAS is ~10% ahead on 2,
   so from 8 on nothing changes; single-token decode (n = 1 never used tinyBLAS) and prompt
   processing (>= 8 tokens) take the same path as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

SGEMM = "vendor/llama.cpp/ggml/src/ggml-cpu/llamafile/sgemm.cpp"
EDITS = [
    (
        SGEMM,
        """    case GGML_TYPE_Q8_0: {
        if (Btype != GGML_TYPE_Q8_0)
           return false;
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__AVX__)
""",
        """    case GGML_TYPE_Q8_0: {
        if (Btype != GGML_TYPE_Q8_0)
           return false;
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__AVX__)
        if (n < 8)
            return false;  // corral: ggml's vec_dot path is faster for few columns (scripts/patch-llama.py)
""",
    ),
]


def main(root: Path) -> None:
    for rel, old, new in EDITS:
        path = root / rel
        text = path.read_text()
        if new in text:
            continue
        if text.count(old) != 1:
            raise SystemExit(f"patch-llama: {rel} does not contain the expected text; check scripts/patch-llama.py")
        path.write_text(text.replace(old, new))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
