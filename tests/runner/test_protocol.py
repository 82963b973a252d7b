"""Wire types: round-trips, rejection of unknown tags/versions, Ollama defaults; the TextStream."""

from __future__ import annotations

import msgspec
import pytest

from corral.runner.common import TextStream
from corral.runner.protocol import (
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    EmbedRequest,
    EmbedResponse,
    FakeKnobs,
    Health,
    LaunchSpec,
    LoadFailed,
    Loading,
    MemoryUse,
    Ready,
    SamplingOptions,
    Warm,
    decode_completion_event,
    decode_event,
    decode_launch,
    encode,
)

EVENTS = [
    Warm(),
    Loading(progress=0.5),
    Ready(
        port=1234,
        pid=42,
        n_ctx=8192,
        n_ctx_per_slot=2048,
        parallel=4,
        n_ctx_train=32768,
        memory={"CPU": MemoryUse(weights=10, kv=20, compute=30), "CUDA0": MemoryUse(weights=1)},
        load_duration=123,
    ),
    LoadFailed(reason="cudaMalloc failed: out of memory", oom=True),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_events_round_trip(event):
    line = encode(event)
    assert b"\n" not in line
    assert decode_event(line) == event


def test_launch_spec_round_trips_with_defaults_and_knobs():
    spec = LaunchSpec(
        model_path="/m.gguf",
        engine="fake",
        parallel=4,
        tensor_split=[0.5, 0.5],
        kv_cache_type="q8_0",
        flash_attention=True,
        fake=FakeKnobs(
            load_time=1.5,
            fail_load_oom=True,
            crash_after_tokens=3,
            memory={"CUDA0": MemoryUse(weights=5)},
        ),
    )
    assert decode_launch(encode(spec)) == spec
    minimal = decode_launch(b'{"type":"launch","version":1,"model_path":"/m.gguf"}')
    assert minimal.engine == "llama" and minimal.num_ctx == 4096 and minimal.parallel == 1
    assert minimal.use_mmap and minimal.num_batch == 512 and minimal.fake == FakeKnobs()


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"launch","version":2,"model_path":"/m"}',  # unknown version
        b'{"type":"launch","model_path":"/m","version":"1"}',
        b'{"type":"lunch","version":1,"model_path":"/m"}',  # unknown tag
        b'{"type":"launch","version":1}',  # missing field
        b'{"type":"launch","version":1,"model_path":"/m","engine":"vllm"}',
        b"not json",
    ],
)
def test_bad_launch_lines_are_rejected(line):
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode_launch(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"type":"ready","version":2,"port":1,"pid":1,"n_ctx":1,"n_ctx_per_slot":1,"parallel":1}',
        b'{"type":"exploded","version":1}',
        b'{"type":"launch","version":1,"model_path":"/m"}',  # not an event
        b'{"type":"failed","version":1}',
    ],
)
def test_bad_events_are_rejected(line):
    with pytest.raises(msgspec.ValidationError):
        decode_event(line)


def test_completion_events_are_tagged():
    for ev in [
        CompletionChunk(content="é"),
        CompletionDone(tokens=[1, 2], eval_count=1),
        CompletionError(error="x"),
    ]:
        line = encode(ev)
        assert msgspec.json.decode(line)["type"] in {"chunk", "done", "error"}
        assert decode_completion_event(line) == ev


def test_sampling_options_have_ollama_defaults():
    o = SamplingOptions()
    assert (o.num_keep, o.seed, o.num_predict, o.top_k, o.top_p, o.min_p, o.typical_p) == (
        4,
        -1,
        -1,
        40,
        0.9,
        0.0,
        1.0,
    )
    assert (o.repeat_last_n, o.temperature, o.repeat_penalty) == (64, 0.8, 1.0)
    assert (o.presence_penalty, o.frequency_penalty, o.stop) == (0.0, 0.0, [])


def test_http_bodies_round_trip():
    req = CompletionRequest(prompt="hi", options=SamplingOptions(seed=1), format={"type": "object"})
    assert msgspec.json.decode(encode(req), type=CompletionRequest) == req
    assert msgspec.json.decode(b'{"prompt":"x"}', type=CompletionRequest).stream is True
    assert msgspec.json.decode(b'{"input":["a"]}', type=EmbedRequest).truncate is True
    resp = EmbedResponse(embeddings=[[0.6, 0.8]], prompt_eval_count=2)
    assert msgspec.json.decode(encode(resp), type=EmbedResponse) == resp
    assert msgspec.json.decode(encode(Health(slots_total=2)), type=Health).slots_total == 2


def test_protocol_does_not_import_llama_cpp():
    import ast
    import pathlib

    import corral.runner.protocol as p

    tree = ast.parse(pathlib.Path(p.__file__).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "typing", "msgspec"}


# -- TextStream -----------------------------------------------------------------------------------


def feed_all(stream: TextStream, pieces: list[bytes]) -> list[str]:
    out = [stream.feed(p) for p in pieces]
    out.append(stream.finish())
    return [o for o in out if o]


def test_utf8_split_over_tokens_is_emitted_whole():
    text = "hé€😀!"
    data = text.encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per token
    chunks = feed_all(TextStream([]), pieces)
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert "😀" in chunks  # the 4-byte character came out in one piece, once complete


def test_broken_trailing_bytes_become_a_replacement_at_the_end():
    assert feed_all(TextStream([]), [b"ok", b"\xe2\x82"]) == ["ok", "\ufffd"]


def test_stop_string_across_tokens_never_leaks():
    s = TextStream(["STOP"])
    out = feed_all(s, [b"abc S", b"T", b"O", b"P and more", b"never"])
    assert "".join(out) == "abc " and s.stopped


def test_stop_prefix_is_held_then_released():
    s = TextStream(["</end>"])
    assert s.feed(b"a</e") == "a"
    assert s.feed(b"x") == "</ex"
    assert s.finish() == ""


def test_earliest_stop_wins_and_text_is_collected():
    s = TextStream(["world", "lo w"])
    feed_all(s, [b"hello world"])
    assert "".join(s.text) == "hel"


def test_runner_sets_openmp_spin_unless_the_user_chose():
    from corral.runner.__main__ import GOMP_SPINCOUNT, openmp_wait_policy

    env: dict[str, str] = {}
    openmp_wait_policy(env)
    assert env == {"GOMP_SPINCOUNT": GOMP_SPINCOUNT}
    for mine in ({"GOMP_SPINCOUNT": "INFINITE"}, {"OMP_WAIT_POLICY": "active"}):
        env = dict(mine)
        openmp_wait_policy(env)
        assert env == mine


def test_runner_keeps_numpys_blas_to_one_thread_unless_the_user_chose():
    from corral.runner.__main__ import blas_threads

    env: dict[str, str] = {}
    blas_threads(env)
    assert env == {"OPENBLAS_NUM_THREADS": "1"}
    env = {"OPENBLAS_NUM_THREADS": "4"}
    blas_threads(env)
    assert env == {"OPENBLAS_NUM_THREADS": "4"}


def test_runner_runs_on_the_daemons_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """CORRAL_EVENT_LOOP, inherited from the daemon: uvloop unless asyncio's own is asked for or
    uvloop is missing."""
    import sys

    from corral.runner.__main__ import event_loop

    uvloop = pytest.importorskip("uvloop")  # a core dependency except on Windows
    for value in (None, "auto", "uvloop", "UVLOOP"):
        if value is None:
            monkeypatch.delenv("CORRAL_EVENT_LOOP", raising=False)
        else:
            monkeypatch.setenv("CORRAL_EVENT_LOOP", value)
        assert event_loop() is uvloop.new_event_loop
    monkeypatch.setenv("CORRAL_EVENT_LOOP", "AsyncIO")
    assert event_loop() is None
    monkeypatch.setenv("CORRAL_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    assert event_loop() is None
