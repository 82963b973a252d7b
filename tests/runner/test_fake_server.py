"""The runner's HTTP API and request pipe over the FakeEngine (no llama.cpp)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import msgspec
import pytest

from corral.runner.fake import FakeEngine
from corral.runner.protocol import (
    Cancel,
    CompletionChunk,
    CompletionDone,
    CompletionError,
    CompletionRequest,
    FakeKnobs,
    LaunchSpec,
    Refused,
    Relay,
    RelayStep,
    Submit,
    decode_event,
    encode,
)
from corral.runner.server import INLINE_SUBMIT, PipeReader, PipeRelay, RunnerServer
from tests.runner.conftest import complete, serve, wait_until


def fake(parallel: int = 2, **knobs) -> FakeEngine:
    e = FakeEngine(
        LaunchSpec(
            model_path="fake.gguf",
            engine="fake",
            parallel=parallel,
            num_ctx=64,
            fake=FakeKnobs(**knobs),
        )
    )
    e.load(lambda p: None)
    e.start()
    return e


@pytest.fixture
def engine():
    e = fake(tokens_per_second=2000)
    yield e
    e.close()


async def test_health_and_stream(engine):
    async with serve(engine) as (client, _):
        health = await (await client.get("/health")).json()
        assert health == {
            "status": "ok",
            "slots_total": 2,
            "slots_busy": 0,
            "queued": 0,
            "kv_used": 0,
            "kv_total": engine.n_ctx,
        }
        chunks, done = await complete(client, prompt="hi", options={"num_predict": 7})
        assert done["eval_count"] == 7 and done["done_reason"] == "length" and len(chunks) == 7
        assert done["prompt_eval_count"] == 2 and done["tokens"][:2] == [104, 105]
        text = await (await client.post("/detokenize", json={"tokens": done["tokens"]})).json()
        assert text["content"] == "hi" + "".join(chunks)


async def test_non_streaming_returns_one_object(engine):
    async with serve(engine) as (client, _):
        resp = await client.post(
            "/completion", json={"prompt": "x", "stream": False, "options": {"num_predict": 3}}
        )
        body = await resp.json()
        assert body["type"] == "done" and body["eval_count"] == 3 and body["content"]


async def test_stop_and_default_length(engine):
    async with serve(engine) as (client, _):
        _, done = await complete(client, prompt="x", options={"seed": 1})
        assert done["eval_count"] == 16 and done["done_reason"] == "stop"
        chunks, done = await complete(
            client, prompt="x", options={"seed": 1, "stop": ["the", " fox"]}
        )
        assert all("fox" not in c for c in chunks) and done["done_reason"] == "stop"


async def test_bad_requests_get_400(engine):
    async with serve(engine) as (client, _):
        assert (await client.post("/completion", data=b"{nope")).status == 400
        assert (await client.post("/completion", json={"prompt": ""})).status == 400
        r = await client.post("/completion", json={"prompt": "x" * 100, "truncate": False})
        assert r.status == 400 and "context length" in (await r.json())["error"]
        assert (
            await client.post("/embed", json={"input": ["x" * 100], "truncate": False})
        ).status == 400
        r = await client.post("/completion", json={"prompt": "x", "options": {"top_k": "lots"}})
        assert r.status == 400 and "top_k" in (await r.json())["error"]


async def test_queueing_beyond_parallel_and_cancel_frees_slot():
    engine = fake(parallel=1, tokens_per_second=200)
    try:
        async with serve(engine) as (client, _):
            long = await client.post(
                "/completion", json={"prompt": "a", "options": {"num_predict": 100000}}
            )
            await long.content.readline()
            assert engine.busy() == 1
            short_task = client.post(
                "/completion", json={"prompt": "b", "options": {"num_predict": 2}}
            )
            async with short_task as short:
                await wait_until(lambda: engine.queued() == 1)
                long.close()  # the client goes away: the slot frees at the next step
                lines = [json.loads(x) async for x in short.content]
                assert lines[-1]["type"] == "done" and lines[-1]["eval_count"] == 2
            await wait_until(lambda: engine.busy() == 0)
    finally:
        engine.close()


async def test_embed_tokenize(engine):
    async with serve(engine) as (client, _):
        body = await (await client.post("/embed", json={"input": ["a", "b", "a"]})).json()
        a, b, a2 = body["embeddings"]
        assert a == a2 and a != b and abs(sum(v * v for v in a) - 1) < 1e-6
        toks = await (await client.post("/tokenize", json={"content": "hé"})).json()
        assert toks == {"tokens": [104, 195, 169]}


async def test_draining_refuses_new_work(engine):
    async with serve(engine) as (client, server):
        server.draining = True
        assert (await client.post("/completion", json={"prompt": "x"})).status == 503
        assert (await (await client.get("/health")).json())["status"] == "draining"


async def test_cancel_all_ends_streams_with_error(engine):
    async with serve(engine) as (client, _):
        resp = await client.post(
            "/completion", json={"prompt": "a", "options": {"num_predict": 100000}}
        )
        await resp.content.readline()
        engine.cancel_all("runner is shutting down")
        lines = [json.loads(x) async for x in resp.content]
        assert lines[-1] == {"type": "error", "error": "runner is shutting down"}


async def test_unknown_route_is_json_404(engine):
    async with serve(engine) as (client, _):
        r = await client.get("/nope")
        assert r.status == 404 and "error" in await r.json()


async def test_events_waiting_together_go_out_in_one_http_chunk(engine):
    """A stream whose reader fell behind gets what is queued in one chunk, not one per token:
    here the whole answer is emitted before the handler starts writing."""
    from corral.runner.common import Job
    from corral.runner.protocol import CompletionChunk, CompletionDone

    class Burst:  # the FakeEngine's interface; the answer is emitted during submit
        def __getattr__(self, name):
            return getattr(engine, name)

        def submit(self, request, emit):
            for text in ("a", "b", "c"):
                emit(CompletionChunk(content=text))
            emit(CompletionDone(eval_count=3))
            return Job(request, emit)

    async with serve(Burst()) as (client, _):
        resp = await client.post("/completion", json={"prompt": "hi"})
        chunks, part = [], b""
        async for data, end_of_chunk in resp.content.iter_chunks():
            part += data
            if end_of_chunk:
                chunks.append(part)
                part = b""
        assert [json.loads(line)["type"] for line in chunks[0].splitlines()] == ["chunk"] * 3 + [
            "done"
        ]


# ---- the request pipe: Submit/Cancel lines in, events up the event pipe ----------------------


class Pipe:
    """The event pipe's write end as PipeRelay sees it: every write kept, decoded into Relay
    events (a RelayStep line is a chunk for each of its ids, as the daemon reads it) and
    Refused lines."""

    def __init__(self) -> None:
        self.writes: list[list[Relay | Refused]] = []
        self.steps = 0  # RelayStep lines seen

    def write(self, data: bytes) -> None:
        assert data.endswith(b"\n")
        out: list[Relay | Refused] = []
        for line in data.splitlines():
            event = decode_event(line)
            if isinstance(event, RelayStep):
                self.steps += 1
                out += [
                    Relay(id=i, event=CompletionChunk(content=text))
                    for i, text in zip(event.ids, event.content, strict=True)
                ]
            else:
                assert isinstance(event, Relay | Refused)
                out.append(event)
        self.writes.append(out)

    def events(self, relay_id: int) -> list:
        return [
            r.event if isinstance(r, Relay) else r
            for w in self.writes
            for r in w
            if r.id == relay_id
        ]

    async def ended(self, relay_id: int) -> Any:
        """The last event of request ``relay_id`` once it came (a done, an error, a refusal)."""
        await wait_until(
            lambda: any(not isinstance(e, CompletionChunk) for e in self.events(relay_id))
        )
        return self.events(relay_id)[-1]


def submit(server: RunnerServer, relay_id: int, **body: Any) -> None:
    """The daemon's Submit line for ``body`` (a CompletionRequest's fields)."""
    request = msgspec.convert(body, CompletionRequest)
    server.pipe_line(encode(Submit(id=relay_id, request=request)))


async def test_piped_events_go_up_the_pipe_one_write_per_step():
    engine = fake(parallel=2, tokens_per_second=500)
    pipe = Pipe()
    try:
        async with serve(engine, PipeRelay(pipe.write)) as (client, server):
            body = {"prompt": "hi", "options": {"num_predict": 6, "seed": 3}}
            plain_chunks, plain_done = await complete(client, **body)  # the same over HTTP
            submit(server, 1, **body)
            submit(server, 2, **body)
            assert server.inflight == 2
            for relay_id in (1, 2):
                assert isinstance(await pipe.ended(relay_id), CompletionDone)
            await wait_until(lambda: server.inflight == 0)  # both ended: their table is empty
        for relay_id in (1, 2):
            events = pipe.events(relay_id)
            assert [e.content for e in events[:-1]] == plain_chunks
            assert events[-1].eval_count == plain_done["eval_count"] == 6
            assert all(isinstance(e, CompletionChunk) for e in events[:-1])
        # both sequences step together: their events of a step share one write, the text of
        # both in one RelayStep line
        assert any({r.id for r in w} == {1, 2} for w in pipe.writes)
        assert len(pipe.writes) <= 8  # 6 tokens + done, two streams: per step, not per event
        assert 5 <= pipe.steps <= 12
    finally:
        engine.close()


async def test_a_whole_answer_is_one_relay_line(engine):
    pipe = Pipe()
    async with serve(engine, PipeRelay(pipe.write)) as (_, server):
        submit(server, 4, prompt="x", stream=False, options={"num_predict": 3})
        done = await pipe.ended(4)
        assert done.eval_count == 3 and len(done.content) > 0
        assert pipe.events(4) == [done] and pipe.steps == 0


async def test_a_cancel_line_stops_the_job_and_nothing_more_comes():
    engine = fake(parallel=1, tokens_per_second=200)
    pipe = Pipe()
    try:
        async with serve(engine, PipeRelay(pipe.write)) as (client, server):
            submit(server, 7, prompt="a", options={"num_predict": 100000})
            await wait_until(lambda: len(pipe.events(7)) >= 2)
            server.pipe_line(encode(Cancel(id=7)))
            assert server.inflight == 0
            await wait_until(lambda: engine.busy() == 0)
            n = len(pipe.events(7))
            _, done = await complete(client, prompt="b", options={"num_predict": 2})
            assert done["eval_count"] == 2
            assert len(pipe.events(7)) == n
            assert not any(isinstance(e, CompletionDone) for e in pipe.events(7))
            server.pipe_line(encode(Cancel(id=7)))  # again, or for an id that ended: ignored
            server.pipe_line(encode(Cancel(id=99)))
    finally:
        engine.close()


async def test_a_cancel_while_a_big_request_is_submitted_off_the_loop_cancels_it():
    """A prompt over INLINE_SUBMIT is submitted from an executor thread; a Cancel line that
    comes meanwhile (or just after) still stops its job, and its table entry goes."""
    engine = fake(parallel=1, tokens_per_second=200)
    pipe = Pipe()
    try:
        async with serve(engine, PipeRelay(pipe.write)) as (_, server):
            for relay_id in (1, 2, 3):
                submit(server, relay_id, prompt="x" * (INLINE_SUBMIT + 1))
                server.pipe_line(encode(Cancel(id=relay_id)))
            await wait_until(lambda: server.inflight == 0)
            await wait_until(lambda: engine.busy() == 0 and engine.queued() == 0)
            assert not any(isinstance(e, CompletionDone) for i in (1, 2, 3) for e in pipe.events(i))
    finally:
        engine.close()


async def test_refusals_and_errors_come_through_the_pipe(engine):
    pipe = Pipe()
    async with serve(engine, PipeRelay(pipe.write)) as (_, server):
        submit(server, 1, prompt="")  # the engine's BadRequest
        assert pipe.events(1) == [Refused(id=1, status=400, error="empty prompt")]
        server.pipe_line(b'{"type":"completion","id":3,"request":{"prompt":5}}')  # bad field
        (bad,) = pipe.events(3)
        assert bad.status == 400 and "bad request line" in bad.error
        writes = len(pipe.writes)
        server.pipe_line(b"not json")  # no id to answer: logged only
        server.pipe_line(b'{"type":"launch"}')
        assert len(pipe.writes) == writes
        submit(server, 2, prompt="a", options={"num_predict": 100000})
        await wait_until(lambda: len(pipe.events(2)) >= 1)
        engine.cancel_all("runner is shutting down")
        assert await pipe.ended(2) == CompletionError(error="runner is shutting down")
        await wait_until(lambda: server.inflight == 0)


async def test_draining_refuses_piped_work_and_waits_for_what_runs():
    """SIGTERM's drain: a new piped request is refused (503, Busy in the daemon); wait_idle
    returns only once the piped job in flight has ended."""
    engine = fake(parallel=1, tokens_per_second=200)
    pipe = Pipe()
    try:
        async with serve(engine, PipeRelay(pipe.write)) as (_, server):
            submit(server, 1, prompt="a", options={"num_predict": 20})
            await wait_until(lambda: len(pipe.events(1)) >= 1)
            server.draining = True
            submit(server, 2, prompt="b")
            assert pipe.events(2) == [Refused(id=2, status=503, error="runner is shutting down")]
            idle = asyncio.ensure_future(server.wait_idle())
            await asyncio.sleep(0)
            assert not idle.done() and server.inflight == 1
            await asyncio.wait_for(idle, 10)
            assert isinstance(pipe.events(1)[-1], CompletionDone)
            await asyncio.wait_for(server.wait_idle(), 10)  # nothing in flight: at once
    finally:
        engine.close()


async def test_a_request_line_may_come_in_pieces_and_lines_together():
    """The runner's reader of its stdin: a line split over reads (a big request), several in
    one read, and what followed the LaunchSpec line in its read."""
    lines: list[bytes] = []
    eofs: list[bool] = []
    reader = PipeReader(lambda: eofs.append(True), rest=b'{"a"')
    reader.data_received(b":1}\n{")  # before start: kept for it
    assert lines == []
    reader.start(lines.append)
    assert lines == [b'{"a":1}']
    reader.data_received(b'"b":2}\n\n{"c":3}\n')
    reader.data_received(b'{"d":')
    reader.data_received(b"4}\n")
    assert lines == [b'{"a":1}', b'{"b":2}', b'{"c":3}', b'{"d":4}']
    reader.eof_received()
    assert eofs == [True]


async def test_small_completions_are_submitted_on_the_loop_others_in_a_thread(engine, monkeypatch):
    """A short prompt without images or a format skips the executor hop (a tiny request's two
    thread wake-ups); a long one, or one with a format grammar, is tokenized off the loop."""
    threads: list[str] = []
    engine_submit = engine.submit

    def recording(request, emit, *relay):
        threads.append(threading.current_thread().name)
        return engine_submit(request, emit, *relay)

    monkeypatch.setattr(engine, "submit", recording)
    loop_thread = threading.current_thread().name
    pipe = Pipe()
    bodies = [
        {"prompt": "x" * INLINE_SUBMIT},
        {"prompt": "x" * (INLINE_SUBMIT + 1)},
        {"prompt": "x", "tokens": [1] * INLINE_SUBMIT},
        {"prompt": "x", "format": "json"},
        {"prompt": "", "tokens": []},  # refused (400) wherever it is submitted
    ]
    async with serve(engine, PipeRelay(pipe.write)) as (client, server):
        statuses = []
        for body in bodies:
            body |= {"stream": False, "options": {"num_predict": 1}}
            statuses.append((await client.post("/completion", json=body)).status)
        for relay_id, body in enumerate(bodies, 1):  # the request pipe decides alike
            submit(server, relay_id, **body)
            ended = await pipe.ended(relay_id)
            statuses.append(ended.status if isinstance(ended, Refused) else 200)
    assert statuses == [200, 200, 200, 200, 400] * 2
    on_loop = [name == loop_thread for name in threads]
    assert on_loop == [True, False, False, False, True] * 2
