"""Source edits applied to the llama-cpp-python sdist before scripts/install-llama.sh builds it.

    python scripts/patch-llama.py SDIST_DIR [--only decode|load]

Two groups: "decode" (1) changes the speed of what bench/vs_llama_server.py measures, and is
what scripts/build-llama-server.sh's patched build applies; "load" (2, 3) only makes a model
load faster. Each edit replaces one exact text; an edit whose result is already there is
skipped; an edit whose text is missing fails the install (a silent skip would silently lose the
speed-up), so a new llama-cpp-python version needs this file checked. Changing this file
changes the wheel cache key.

1. llamafile sgemm (tinyBLAS) Q8_0 x Q8_0 on x86 only from 8 columns on. Below that ggml's
   own vec_dot path is faster: Gemma 3 270M's 640 x 262144 Q8_0 output projection on one Zen 5
   core costs ~7.5 ms per column through vec_dot but ~18 ms (2 columns) and ~13 ms (4) per
   column through tinyBLAS (k = 20 blocks per row is too short to amortise its tile overhead).
   A whole 4-sequence decode step: 66 -> 45 ms on 1 thread, ~34-51 -> ~28-44 ms on 2 threads
   (bench/runner.py). At 8 columns the two are even on 1 thread and tinyBLAS is ~10% ahead on 2,
   so from 8 on nothing changes; single-token decode (n = 1 never used tinyBLAS) and prompt
   processing (>= 8 tokens) take the same path as before.

2. The model loader's metadata dump formats an array value only until it is longer than the 40
   characters it prints. Upstream formats the whole array and then cuts it: for Gemma 3's
   262,144 tokens, scores and token types that is ~0.1 s of every load (a copy and two
   replace_all per token, a std::to_string per score), whatever the log level. The printed lines
   are byte-identical: the text formatted is a prefix of upstream's; once it is longer than 40
   characters, upstream's is too, and both are cut to the same first 37 characters.

3. llama_vocab::impl::load's four passes over token_to_id (special tokens by text, unused
   tokens, end-of-generation tokens, gpt-oss' tokens) visit only the tokens that can change or
   log anything, collected in one pass in token_to_id's own order: a text starting with '<',
   '[', '_' or "▁<" (U+2581 is SentencePiece's space), or the control attribute. Upstream
   compares every token with 4-47 literals per pass: ~0.15 s of a Gemma 3 load. The attributes,
   special ids, EOG set and log lines are the same, in the same order: every action of the
   passes needs a token whose text equals one of their literals (all of which start so:
   check_vocab checks it on the text it patches) or a control token (by its type, or made one
   by an earlier pass because its text equals a literal). The passes are pinned by a hash of
   their text: a llama.cpp that changed them fails the install until this is checked again.
   tests/runner/test_vocab_load.py loads vocabularies holding every literal.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

SGEMM = "vendor/llama.cpp/ggml/src/ggml-cpu/llamafile/sgemm.cpp"
IMPL_H = "vendor/llama.cpp/src/llama-impl.h"
IMPL = "vendor/llama.cpp/src/llama-impl.cpp"
LOADER = "vendor/llama.cpp/src/llama-model-loader.cpp"
VOCAB = "vendor/llama.cpp/src/llama-vocab.cpp"
# edit 3 relies on this text of llama_vocab::impl::load (from START to END, before the edits)
VOCAB_PASSES = (
    "        // auto-detect special tokens by text\n",
    "        // sanity checks\n",
    "3d861d86b62e8829c4d06fc5da92fac40bd9dcd9d37615c79bab16146f0ecfdb",
)
# what corral_may_match accepts: the literals of the passes must all pass it
VOCAB_PREFIXES = ("<", "[", "_", "▁<")
EDITS = [
    (
        "decode",
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
    # 2: the metadata dump
    (
        "load",
        IMPL_H,
        """std::string gguf_kv_to_str(const struct gguf_context * ctx_gguf, int i);
""",
        """// corral: an array's text ends once it is longer than stop_after characters (scripts/patch-llama.py)
std::string gguf_kv_to_str(const struct gguf_context * ctx_gguf, int i, size_t stop_after = std::string::npos);
""",
    ),
    (
        "load",
        IMPL,
        """std::string gguf_kv_to_str(const struct gguf_context * ctx_gguf, int i) {
""",
        """std::string gguf_kv_to_str(const struct gguf_context * ctx_gguf, int i, size_t stop_after) {
""",
    ),
    (
        "load",
        IMPL,
        """                    if (j < arr_n - 1) {
                        ss << ", ";
                    }
                }
                ss << "]";
""",
        """                    if (j < arr_n - 1) {
                        ss << ", ";
                    }
                    if ((size_t) ss.tellp() > stop_after) {
                        return ss.str();  // corral: the caller prints a shorter prefix (scripts/patch-llama.py)
                    }
                }
                ss << "]";
""",
    ),
    (
        "load",
        LOADER,
        """            std::string value          = gguf_kv_to_str(metadata, i);
            const size_t MAX_VALUE_LEN = 40;
""",
        """            const size_t MAX_VALUE_LEN = 40;
            std::string value          = gguf_kv_to_str(metadata, i, MAX_VALUE_LEN);  // corral: scripts/patch-llama.py
""",
    ),
    # 3: the vocabulary's passes over token_to_id
    (
        "load",
        VOCAB,
        """void llama_vocab::impl::load(llama_model_loader & ml, const LLM_KV & kv) {
""",
        """// corral (scripts/patch-llama.py): every literal that load()'s passes over token_to_id compare
// a token's text with starts with one of these
static bool corral_may_match(const std::string & text) {
    return !text.empty() && (text[0] == '<' || text[0] == '[' || text[0] == '_' || text.rfind("▁<", 0) == 0);
}

void llama_vocab::impl::load(llama_model_loader & ml, const LLM_KV & kv) {
""",
    ),
    (
        "load",
        VOCAB,
        """        //       for now, we apply this workaround to find the tokens based on their text

        for (const auto & t : token_to_id) {
            auto & attr = id_to_token[t.second].attr;
""",
        """        //       for now, we apply this workaround to find the tokens based on their text

        // corral: the four passes below visit, in token_to_id's order, only the tokens they can
        // change or log: a control token, or a text that may equal one of their literals
        std::vector<bool> corral_control(id_to_token.size());  // read in id order: no cache miss per token below
        for (size_t i = 0; i < id_to_token.size(); ++i) {
            corral_control[i] = id_to_token[i].attr & LLAMA_TOKEN_ATTR_CONTROL;
        }
        std::vector<const decltype(token_to_id)::value_type *> corral_pass;
        for (const auto & t : token_to_id) {
            if (corral_control[t.second] || corral_may_match(t.first)) {
                corral_pass.push_back(&t);
            }
        }

        for (const auto * corral_t : corral_pass) {
            const auto & t = *corral_t;
            auto & attr = id_to_token[t.second].attr;
""",
    ),
    (
        "load",
        VOCAB,
        """            for (const auto & t : token_to_id) {
                auto & attr = id_to_token[t.second].attr;

                if ((attr & LLAMA_TOKEN_ATTR_CONTROL) == 0) {
""",
        """            for (const auto * corral_t : corral_pass) {
                const auto & t = *corral_t;
                auto & attr = id_to_token[t.second].attr;

                if ((attr & LLAMA_TOKEN_ATTR_CONTROL) == 0) {
""",
    ),
    (
        "load",
        VOCAB,
        """        for (const auto & t : token_to_id) {
            auto & attr = id_to_token[t.second].attr;

            if (false
                    || t.first == "<|eot_id|>"
""",
        """        for (const auto * corral_t : corral_pass) {
            const auto & t = *corral_t;
            auto & attr = id_to_token[t.second].attr;

            if (false
                    || t.first == "<|eot_id|>"
""",
    ),
    (
        "load",
        VOCAB,
        """        for (const auto & t : token_to_id) {
            auto & attr = id_to_token[t.second].attr;

            if (t.first == "<|channel|>" ||""",
        """        for (const auto * corral_t : corral_pass) {
            const auto & t = *corral_t;
            auto & attr = id_to_token[t.second].attr;

            if (t.first == "<|channel|>" ||""",
    ),
]


def check_vocab(text: str) -> None:
    """Edit 3's premises on the unpatched text: the passes are the ones reasoned about, and every
    literal a token's text is compared with passes corral_may_match."""
    start, end, digest = VOCAB_PASSES
    if text.count(start) != 1 or text.count(end) != 1:
        raise SystemExit(f"patch-llama: {VOCAB} has changed; check edit 3 of scripts/patch-llama.py")
    passes = text[text.index(start) : text.index(end)]
    if hashlib.sha256(passes.encode()).hexdigest() != digest:
        raise SystemExit(f"patch-llama: {VOCAB}'s passes over token_to_id changed; check edit 3 of scripts/patch-llama.py")
    literals = re.findall(r't\.first == "((?:[^"\\]|\\.)*)"', passes)
    bad = [lit for lit in literals if not lit.startswith(VOCAB_PREFIXES)]
    if not literals or bad:
        raise SystemExit(f"patch-llama: literals {bad} escape corral_may_match; check edit 3 of scripts/patch-llama.py")


def edits(group: str | None) -> list[tuple[str, str, str]]:
    return [(rel, old, new) for g, rel, old, new in EDITS if group in (None, g)]


def main(argv: list[str]) -> None:
    """SDIST_DIR [--only GROUP]: apply the edits (of one group); --digest GROUP: print a hash of
    that group's edits (scripts/build-llama-server.sh keys its patched build on the decode ones)."""
    if argv[0] == "--digest":
        print(hashlib.sha256(repr(edits(argv[1])).encode()).hexdigest())
        return
    root = Path(argv[0])
    texts: dict[str, str] = {}
    for rel, old, new in edits(argv[2] if argv[1:2] == ["--only"] else None):
        path = root / rel
        text = texts.get(rel) or path.read_text()
        if new in text:
            continue
        if rel == VOCAB and rel not in texts:
            check_vocab(text)
        if text.count(old) != 1:
            raise SystemExit(f"patch-llama: {rel} does not contain the expected text; check scripts/patch-llama.py")
        texts[rel] = text.replace(old, new)
    for rel, text in texts.items():
        (root / rel).write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
