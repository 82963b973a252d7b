"""model_inputs.facts_from_info: what the scheduler's estimate gets from a GGUF header."""

from __future__ import annotations

import os

from corral.daemon import gguf_info
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.model_inputs import facts_from_info
from tests.fixtures.virtual_gguf import N_EMBD, N_VOCAB, write_virtual_llama

GiB = 1 << 30
HEAD = N_VOCAB * N_EMBD * 2  # an F16 vocab x embd matrix
NORM = N_EMBD * 4


def facts_of(path):
    info = gguf_info.read_info(path)
    return info, facts_from_info(info, os.path.getsize(path))


def test_output_layer_is_norm_and_head(tmp_path):
    info, facts = facts_of(write_virtual_llama(tmp_path / "m.gguf", weights_gib=1.0))
    assert facts.output_bytes == NORM + HEAD
    assert facts.token_embd_bytes == HEAD
    assert facts.block_count == 32 and len(facts.layer_bytes) == 32


def test_tied_embeddings_count_token_embd_as_the_output_layer(tmp_path):
    # Ollama's rule (reference §3.3.2): output_norm + (output if present else token_embd).
    info, facts = facts_of(write_virtual_llama(tmp_path / "t.gguf", weights_gib=1.0, tied=True))
    assert info.output_bytes == NORM
    assert facts.output_bytes == NORM + HEAD


def test_file_size_is_never_below_the_tensor_table(tmp_path):
    path = write_virtual_llama(tmp_path / "v.gguf", weights_gib=5.0)
    info, facts = facts_of(path)
    assert os.path.getsize(path) < 1 << 20  # header only
    assert facts.file_size == info.tensor_bytes > 4 * GiB


def test_simulated_probe_reports_free_minus_what_our_runners_hold():
    probe = SimulatedProbe(
        [{"id": "0", "total": 10 * GiB, "free": 6 * GiB}, {"id": "1", "total": 8 * GiB}],
        host=(64 * GiB, 48 * GiB),
    )
    probe.note_usage({"0": 5 * GiB})
    assert [g.free for g in probe.read().gpus] == [1 * GiB, 8 * GiB]
    probe.note_usage({"0": 7 * GiB, "1": 1 * GiB})  # never below zero
    assert [g.free for g in probe.read().gpus] == [0, 7 * GiB]
    probe.note_usage({})
    assert [g.free for g in probe.read().gpus] == [6 * GiB, 8 * GiB]


def test_parsed_headers_are_kept_on_disk_for_the_next_daemon_run(tmp_path, monkeypatch):
    """gguf_info.use_disk_cache: a new run (an empty memory cache) reads the parse back instead
    of walking the header; a changed file is parsed again; a corrupt cache file is parsed again
    and rewritten; without a directory nothing is kept."""
    cache = tmp_path / "cache"
    model = write_virtual_llama(tmp_path / "m.gguf", weights_gib=1.0)
    monkeypatch.setattr(gguf_info, "_disk", None)
    gguf_info.use_disk_cache(cache)
    gguf_info.clear_cache()
    first = gguf_info.read_info(model)
    (kept,) = cache.iterdir()
    parses: list[str] = []
    real_parse = gguf_info._parse

    def counting(p):
        parses.append(str(p))
        return real_parse(p)

    monkeypatch.setattr(gguf_info, "_parse", counting)
    gguf_info.clear_cache()  # what a restart leaves
    assert gguf_info.read_info(model) == first and parses == []
    kept.write_bytes(b"\x93garbage")
    gguf_info.clear_cache()
    assert gguf_info.read_info(model) == first and len(parses) == 1
    gguf_info.clear_cache()
    assert gguf_info.read_info(model) == first and len(parses) == 1  # rewritten whole
    write_virtual_llama(model, weights_gib=2.0)  # the same path, another file
    os.utime(model, ns=(1, 1))
    gguf_info.clear_cache()
    assert gguf_info.read_info(model).tensor_bytes > first.tensor_bytes and len(parses) == 2
    gguf_info.use_disk_cache(None)
    gguf_info.clear_cache()
    before = sorted(cache.iterdir())
    gguf_info.read_info(model)
    assert len(parses) == 3 and sorted(cache.iterdir()) == before
