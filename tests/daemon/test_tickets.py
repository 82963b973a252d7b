"""Who asks, as the supervisor sees it (daemon/ticket.py): the API's ticket middleware gives
every inference request its X-Request-Id, the X-Corral-Priority class and, with API keys, the
key's default priority; bad headers are 400s."""

from __future__ import annotations

from pathlib import Path

from corral.daemon.apikeys import ApiKey, hash_secret, new_secret
from corral.scheduler import Priority
from tests.daemon.test_api_infer_support import make_env
from tests.daemon.test_auth import GEN, call, key_file, keyed_config


async def test_tickets_carry_the_id_the_header_class_and_the_keys_default(tmp_path: Path) -> None:
    batch, user = new_secret(), new_secret()
    keys = [
        ApiKey(name="batch", sha256=hash_secret(batch), priority="low"),
        ApiKey(name="user", sha256=hash_secret(user)),
    ]
    path = key_file(tmp_path / "keys.toml", keys)
    async with make_env(tmp_path, keyed_config(path)) as e:
        tickets = e.supervisor.tickets
        status, _, headers = await call(
            e, "POST", "/api/generate", GEN, {"Authorization": f"Bearer {batch}"}
        )
        headers = {k.lower(): v for k, v in headers.items()}
        assert status == 200 and len(headers["x-request-id"]) == 24
        t = tickets[-1]
        assert (t.id, t.priority, t.key_priority) == (headers["x-request-id"], None, Priority.LOW)
        assert t.client == "127.0.0.1"
        status, _, headers = await call(
            e,
            "POST",
            "/api/generate",
            GEN,
            {
                "Authorization": f"Bearer {batch}",
                "X-Corral-Priority": "High",
                "X-Request-Id": "job-7",
            },
        )
        assert status == 200 and {k.lower(): v for k, v in headers.items()}["x-request-id"] == (
            "job-7"
        )
        assert (tickets[-1].id, tickets[-1].priority) == ("job-7", Priority.HIGH)
        await call(e, "POST", "/api/generate", GEN, {"Authorization": f"Bearer {user}"})
        assert tickets[-1].key_priority is None
        n = len(tickets)
        for bad in ({"X-Corral-Priority": "urgent"}, {"X-Request-Id": "x" * 200}):
            status, body, headers = await call(
                e, "POST", "/api/generate", GEN, {"Authorization": f"Bearer {user}", **bad}
            )
            assert status == 400 and "X-" in body["error"]
        assert len(tickets) == n  # refused before anything was acquired
        # the request list and cancelling need an admin key
        status, _, _ = await call(
            e, "GET", "/api/requests", None, {"Authorization": f"Bearer {user}"}
        )
        assert status == 403


INFERENCE_ROUTES = [
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/responses",
]


async def test_every_inference_route_and_no_other_gets_a_ticket(tmp_path: Path) -> None:
    """The ticket routes are the auth rules marked ``ticket`` (requests.INFERENCE_PATHS): each
    inference route reads X-Corral-Priority before its handler runs; model management does
    not, whatever the header says."""
    bad = {"X-Corral-Priority": "urgent"}
    async with make_env(tmp_path) as e:
        for path in INFERENCE_ROUTES:
            status, body, _ = await call(e, "POST", path, GEN, bad)
            assert status == 400 and "X-Corral-Priority" in str(body), (path, body)
        for method, path in [("POST", "/api/show"), ("GET", "/api/tags"), ("GET", "/v1/models")]:
            status, _, headers = await call(e, method, path, GEN if method == "POST" else None, bad)
            assert status == 200, path
            assert "x-request-id" not in {k.lower() for k in headers}, path
