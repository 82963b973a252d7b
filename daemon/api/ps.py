"""GET /api/ps: the loaded models, rendered in one place from the scheduler's snapshot.

Ollama's fields in Ollama's order (``name``, ``model``, ``size``, ``digest``, ``details``,
``expires_at``, ``size_vram``, ``context_length``), then corral's (``state``, ``gpus``,
``num_parallel``, ``in_flight``, ``queued``, ``pid``, with a policy file ``pinned`` and
``policy``: the keys that apply to the model, and ``runners``: pid, state, GPUs and in-flight of
each of its runners, the first one and its replicas); longest-lived first. One entry per model:
replicas add their memory, GPUs and in-flight requests to their model's entry. Each ``gpus``
entry of simulated GPUs (CORRAL_SIMULATE_GPUS) says ``"simulated": true``; their placement is
the plan, whatever the runner measured. A runner still
loading is not listed (Ollama lists a model once its runner is healthy). ``context_length`` is
the runner's own per-slot context (what it reported when ready), not the requested one.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from corral.daemon.api import auth
from corral.daemon.api.keys import SUPERVISOR
from corral.daemon.api.responses import json_response
from corral.daemon.timefmt import rfc3339
from corral.scheduler import RunnerState

MAX_DURATION_S = ((1 << 63) - 1) / 1e9  # Go's MaxInt64 ns: "forever" in expires_at


def ps_models(sup: Any) -> list[dict[str, Any]]:
    """The ``models`` of /api/ps from ``sup.snapshot()`` (plus the supervisor's records, GPU
    names and GGUF facts)."""
    snap = sup.snapshot()
    now, wall_now = sup.now(), time.time()
    rows: list[tuple[float, dict[str, Any]]] = []
    replicas: dict[str, list[Any]] = {}
    simulated = {"simulated": True} if getattr(sup, "gpus_simulated", False) else {}
    for v in snap.runners:
        if v.replica:
            replicas.setdefault(v.model_key, []).append(v)
    for v in snap.runners:
        if v.state == RunnerState.LOADING or v.replica:
            continue
        if v.state in (RunnerState.EXPIRING, RunnerState.STOPPING):
            remaining = 0.0
        elif v.deadline is not None:
            remaining = max(0.0, v.deadline - now)
        else:  # busy, or kept forever
            remaining = v.keep_alive
        wall = wall_now + min(remaining, MAX_DURATION_S)
        record = sup.record(v)
        name = getattr(record, "name", None) or v.model_key
        details = getattr(record, "details", None)
        if details is not None and not isinstance(details, dict):
            details = msgspec.to_builtins(details)
        p = v.placement
        size = p.total
        facts = sup.facts(v.model_key)
        if p.vram > 0 and facts is not None and p.n_gpu_layers >= facts.block_count + 1:
            # Every layer is on GPU: Ollama's full-offload rule reports size == size_vram
            # (what stays in host memory - token embeddings, pinned buffers - is not "CPU").
            size = p.vram
        extra = replicas.get(v.model_key, [])
        ready = [x for x in extra if x.state != RunnerState.LOADING]
        gpus: dict[str, int] = {}
        for x in (v, *ready):
            for g, b in x.placement.held.items():
                gpus[g] = gpus.get(g, 0) + b
        rows.append(
            (
                wall,
                {
                    "name": name,
                    "model": name,
                    "size": size + sum(x.placement.total for x in ready),
                    "digest": getattr(record, "digest", ""),
                    "details": details or {},
                    "expires_at": rfc3339(wall),
                    "size_vram": p.vram + sum(x.placement.vram for x in ready),
                    "context_length": v.context_length,
                    "state": v.state,
                    "gpus": [
                        {"id": g, "name": sup.gpu_name(g), "vram": b, **simulated}
                        for g, b in gpus.items()
                    ],
                    "num_parallel": v.parallel,
                    "in_flight": v.in_flight + sum(x.in_flight for x in extra),
                    "queued": v.queued,
                    "pid": _pid(sup, v),
                    **_policy_fields(sup, name, v.pinned),
                    "runners": [
                        {
                            "pid": _pid(sup, x),
                            "state": x.state,
                            "gpus": list(x.placement.held),
                            "in_flight": x.in_flight,
                            "replica": x.replica,
                        }
                        for x in (v, *extra)
                    ],
                },
            )
        )
    rows.sort(key=lambda x: x[0], reverse=True)
    return [row for _, row in rows]


def _pid(sup: Any, v: Any) -> int | None:
    """The runner's pid: as reported when ready, else its process's (still loading)."""
    if v.pid is not None:
        return v.pid
    proc = sup.runner_process(v.runner_id)
    return proc.pid if proc is not None else None


def _policy_fields(sup: Any, name: str, pinned: bool) -> dict[str, Any]:
    """What the operator's policy file says for this model, when it says anything."""
    rule = sup.policy_for(name)
    return {"pinned": pinned, "policy": rule} if rule else {}


async def ps(request: web.Request) -> web.Response:
    models = [m for m in ps_models(request.app[SUPERVISOR]) if auth.may_use(request, m["name"])]
    return json_response({"models": models})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/ps", ps)
