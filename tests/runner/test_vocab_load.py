"""What llama.cpp's model load decides and logs about a vocabulary and a GGUF's metadata, against
upstream's rules written out here: scripts/patch-llama.py edits both (the metadata dump formats
arrays only as far as it prints them; the vocabulary's passes over its tokens visit only the
tokens that can match), and these tests hold the edited build to the same results.

The vocabularies are the tiny fixture's plus every literal that llama_vocab::impl::load compares
token texts with (llama.cpp of llama-cpp-python 0.3.36, src/llama-vocab.cpp), spread over several
files so that no file has two candidates for one special id (upstream takes the first in its
hash map's order, which is not ours to predict), with near misses, both token types, and the
rules that take tokens out of the end-of-generation set again. Loads run in a subprocess: the
log callback is process-wide and the engine's tests own it.
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_gguf import EOS, vocabulary, write_tiny_llama

pytest.importorskip("llama_cpp")

# llama.h: token types (GGUF) and attributes
NORMAL_T, CONTROL_T, USER_DEFINED_T, UNUSED_T = 1, 3, 4, 5
UNKNOWN, UNUSED, NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 2, 4, 8, 16, 32
TYPE_ATTR = {0: 0, 1: NORMAL, 2: UNKNOWN, 3: CONTROL, 4: USER_DEFINED, 5: UNUSED, 6: BYTE}

# llama_vocab::impl::load's literals, pass by pass: the special ids found by text...
BY_TEXT = {
    "eot": [
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
        "<end_of_utterance>",
    ],
    "eom": ["<|eom_id|>"],
    "fim_pre": [
        "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
        "<|code_prefix|>", "<|prefix|>",
    ],
    "fim_suf": [
        "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
        "<|code_suffix|>", "<|suffix|>",
    ],
    "fim_mid": [
        "<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
        "<|code_middle|>", "<|middle|>",
    ],
    "fim_pad": ["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    "fim_rep": ["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"],
    "fim_sep": ["<|file_sep|>"],
}  # fmt: skip
# ...the end-of-generation tokens...
EOG = [
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
]  # fmt: skip
# ...and gpt-oss' tokens, always rendered
GPT_OSS = ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"]
BASE = set(vocabulary()[0])  # holds "</s>" (eos) already
EOG_ONLY = [t for t in EOG if t not in BASE and not any(t in lits for lits in BY_TEXT.values())]
NEAR_MISSES = [
    "<|eot_id|> ", "<|eot_id", "x<|eot_id|>", "▁<PRE", "▁<PRE>x", "▁▁<PRE>", "<PRE>\n", "[EOT",
    "_<EOT", "<｜end▁of▁sentence", "<|channel|", "<eos", "[e~", "▁<", "<|", "<unused",
]  # fmt: skip


def variants() -> list[list[tuple[str, int]]]:
    """Extra tokens per file: the k-th literal of every special id in file k (so at most one
    candidate each), the end-of-generation-only literals and gpt-oss' spread over the files,
    alternately of type normal and control, then the near misses (normal), unused-looking
    tokens and a control token that starts like no literal."""
    n = max(len(lits) for lits in BY_TEXT.values())
    files: list[list[str]] = [
        [lits[k] for lits in BY_TEXT.values() if k < len(lits)] for k in range(n)
    ]
    for i, text in enumerate(EOG_ONLY + GPT_OSS):
        files[i % n].append(text)
    # the rules that take a token out of the end-of-generation set again, and one that doesn't
    files += [
        ["<|return|>", "<|call|>", "<|end|>"],
        ["<|calls|>", "<|flush|>", "<|end|>"],
        ["<|return|>", "<|end|>"],
        ["<|tool_response>", "<|channel|>"],
    ]
    out = []
    for k, texts in enumerate(files):
        tokens = [(t, CONTROL_T if (i + k) % 2 else NORMAL_T) for i, t in enumerate(texts)]
        tokens += [(t, NORMAL_T) for t in NEAR_MISSES]
        tokens += [
            ("<unused0>", CONTROL_T),  # control with "unused": marked unused
            ("<unused1>", NORMAL_T),  # not control: left alone
            ("ctl_unused", CONTROL_T),  # control, starts like no literal: still marked
            ("ctl_plain", CONTROL_T),  # control, not end-of-generation: a debug line
            ("user<|end|>", USER_DEFINED_T),
            ("<|unused|>", UNUSED_T),
        ]
        assert not {t for t, _ in tokens} & BASE and len({t for t, _ in tokens}) == len(tokens)
        out.append(tokens)
    return out


def expected(extra: list[tuple[str, int]]) -> dict:
    """Upstream's llama_vocab::impl::load for the tiny vocabulary plus ``extra`` (the GGUF gives
    unk, bos and eos ids; every other special id is found by text)."""
    base_tokens, _, base_types = vocabulary()
    tokens = base_tokens + [t for t, _ in extra]
    attr = [TYPE_ATTR[k] for k in base_types + [k for _, k in extra]]
    ids = {t: i for i, t in enumerate(tokens)}
    warned: set[int] = set()

    def control(i: int) -> None:
        if not attr[i] & CONTROL:
            warned.add(i)  # "control-looking token ... will be overridden"
            attr[i] |= CONTROL

    special = {}
    for name, lits in BY_TEXT.items():
        found = [ids[t] for t in lits if t in ids]
        assert len(found) <= 1
        special[name] = found[0] if found else -1
        if found:
            control(found[0])
    for i, t in enumerate(tokens):
        if attr[i] & CONTROL and "unused" in t:
            attr[i] |= UNUSED
    n_unused = sum(1 for a in attr if a & CONTROL and a & UNUSED)
    eog = {special[k] for k in ("fim_pad", "fim_rep", "fim_sep") if special[k] != -1}
    for t in EOG:
        if t in ids:
            eog.add(ids[t])
            control(ids[t])
    not_eog = {i for i, a in enumerate(attr) if a & CONTROL and not a & UNUSED} - eog
    for t in GPT_OSS:
        if t in ids:
            attr[ids[t]] = USER_DEFINED
    eog |= {EOS} | {special[k] for k in ("eot", "eom") if special[k] != -1}
    listed = sorted(eog)  # "printing all EOG tokens", before the two rules below
    texts = {tokens[i] for i in eog}
    has_call = "<|call|>" in texts or "<|calls|>" in texts
    if "<|end|>" in texts and has_call and ("<|return|>" in texts or "<|flush|>" in texts):
        eog.discard(ids["<|end|>"])
        attr[ids["<|end|>"]] = USER_DEFINED
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
        eog.discard(ids["</s>"])
        attr[ids["</s>"]] = NORMAL
    return {
        "special": {k: special[k] for k in BY_TEXT if k != "eom"},
        "eog": sorted(eog),
        "attr": attr,
        "warned": sorted(warned),
        "not_eog": sorted(not_eog),
        "n_unused": n_unused,
        "listed": listed,
        "texts": tokens,
    }


LOADER = r"""
import base64, ctypes, json, sys
import llama_cpp as L

lines = []

@L.llama_log_callback
def cb(level, text, ud):
    lines.append(text or b"")

L.llama_log_set(cb, ctypes.c_void_p(0))
L.llama_backend_init()
out = []
for path in sys.argv[1:]:
    lines.clear()
    p = L.llama_model_default_params()
    p.vocab_only = True
    m = L.llama_model_load_from_file(path.encode(), p)
    assert m, path
    v = L.llama_model_get_vocab(m)
    n = L.llama_vocab_n_tokens(v)
    out.append({
        "special": {k: getattr(L, "llama_vocab_" + k)(v) for k in
                    ["eot", "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep"]},
        "eog": [i for i in range(n) if L.llama_vocab_is_eog(v, i)],
        "attr": [int(L.llama_vocab_get_attr(v, i)) for i in range(n)],
        "log": base64.b64encode(b"".join(lines)).decode(),
    })
    L.llama_model_free(m)
print(json.dumps(out))
"""


def load(paths: list[Path]) -> list[dict]:
    """llama.cpp's view of each GGUF (vocabulary only) and the bytes of its load's log."""
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    got = json.loads(done.stdout)
    for g in got:
        g["log"] = base64.b64decode(g["log"])
    return got


def test_special_tokens_eog_and_attributes_follow_upstreams_rules(tmp_path):
    extras = variants()
    paths = [
        write_tiny_llama(tmp_path / f"v{k}.gguf", extra_tokens=extra)
        for k, extra in enumerate(extras)
    ]
    for k, (extra, got) in enumerate(zip(extras, load(paths), strict=True)):
        want = expected(extra)
        where = f"file {k}: {[t for t, _ in extra]}"
        assert got["special"] == want["special"], where
        assert got["eog"] == want["eog"], where
        assert got["attr"] == want["attr"], where
        log = got["log"].decode("utf-8")
        texts = want["texts"]
        warned = [
            int(line.split()[3])
            for line in log.splitlines()
            if "control-looking token" in line and "was not control-type" in line
        ]
        assert sorted(warned) == want["warned"], where
        not_eog = [
            int(line.split()[3]) for line in log.splitlines() if "is not marked as EOG" in line
        ]
        assert sorted(not_eog) == want["not_eog"], where
        assert f"load: {want['n_unused']} unused tokens\n" in log, where
        after = log.split("load: printing all EOG tokens:\n")[1].splitlines()
        listed = [
            line for line in after[: len(want["listed"]) + 1] if line.startswith("load:   - ")
        ]
        assert listed == [f"load:   - {i} ('{texts[i]}')" for i in want["listed"]], where
    # every literal of every pass was in some file, as each of both types
    seen = {(t, k) for extra in extras for t, k in extra}
    for t in {t for lits in BY_TEXT.values() for t in lits} | set(EOG_ONLY) | set(GPT_OSS):
        assert (t, NORMAL_T) in seen or (t, CONTROL_T) in seen


# the metadata dump: "%s: - kv %3d: %42s %-16s = %s\n" with the value cut to 37 bytes + "..."
# when longer than 40, then newlines escaped
GGUF_TYPE = {"u8": 0, "i32": 5, "f32": 6, "bool": 7, "str": 8}


def dump_value(kind: str, values: list) -> bytes:
    """gguf_kv_to_str of an array, then the loader's cut and escape (bytes, as llama.cpp)."""
    if kind == "str":
        parts = [
            b'"' + v.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"' for v in values
        ]
    elif kind == "f32":
        parts = [b"%f" % struct.unpack("f", struct.pack("f", v))[0] for v in values]
    elif kind == "bool":
        parts = [b"true" if v else b"false" for v in values]
    else:
        parts = [str(v).encode() for v in values]
    value = b"[" + b", ".join(parts) + b"]"
    if len(value) > 40:
        value = value[:37] + b"..."
    return value.replace(b"\n", b"\\n")


ARRAYS = {
    # a cut right after, inside and before escapes and newlines; 39, 40 and 41 bytes; a
    # character of 3 bytes across the cut; long arrays of every element type
    "t.quote_at_cut": ("str", ["abcdefghijklmnopqrstuvwxyz01234", 'x"y', "z"]),
    "t.backslash_at_cut": ("str", ["abcdefghijklmnopqrstuvwxyz0123", "\\\\\\", "tail"]),
    "t.newline_early": ("str", ["a\nb", "c\n", "\n" * 30, "d"]),
    "t.len39": ("str", ["abcdefghijklmnopqrstuvwxyz012345"]),
    "t.len40": ("str", ["abcdefghijklmnopqrstuvwxyz0123456"]),
    "t.len41": ("str", ["abcdefghijklmnopqrstuvwxyz01234567"]),
    "t.len41_two": ("str", ["abcdefghijklmnopqrstuvw", "xyz0123"]),
    "t.utf8_at_cut": ("str", ["abcdefghijklmnopqrstuvwxyz0123", "▁▁▁", "x"]),
    "t.one_empty": ("str", [""]),
    "t.floats": ("f32", [-1000.0, 0.5, 1e-7, 3.25e9, -0.0] * 1000),
    "t.ints": ("i32", list(range(-5, 5000))),
    "t.bytes": ("u8", [0, 7, 255, 12] * 500),
    "t.bools": ("bool", [True, False, False] * 300),
    "t.strs": ("str", [f"tok{i}" for i in range(20000)]),
}


def test_metadata_dump_prints_upstreams_lines(tmp_path):
    import gguf

    t = gguf.GGUFValueType
    element = {"u8": t.UINT8, "i32": t.INT32, "f32": t.FLOAT32, "bool": t.BOOL, "str": t.STRING}

    def add(w: gguf.GGUFWriter) -> None:
        for key, (kind, values) in ARRAYS.items():
            w.add_key_value(key, values, t.ARRAY, sub_type=element[kind])

    path = write_tiny_llama(tmp_path / "kv.gguf", extra_kv=add)
    (got,) = load([path])
    lines = [ln for ln in got["log"].split(b"\n") if ln.startswith(b"llama_model_loader: - kv ")]
    by_key = {ln.split(b": ", 2)[2][:42].strip(): ln for ln in lines}
    tokens, scores, types = vocabulary()
    cases = {
        **ARRAYS,
        "tokenizer.ggml.tokens": ("str", tokens),
        "tokenizer.ggml.scores": ("f32", scores),
        "tokenizer.ggml.token_type": ("i32", types),
    }
    for key, (kind, values) in cases.items():
        line = by_key[key.encode()]
        i = lines.index(line)
        type_name = f"arr[{kind},{len(values)}]".encode()
        want = b"llama_model_loader: - kv %3d: %42s %-16s = %s" % (
            i,
            key.encode(),
            type_name,
            dump_value(kind, values),
        )
        assert line == want
