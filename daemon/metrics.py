"""Prometheus metrics for ``GET /metrics`` (text format written by ``prometheus-client``).

Two kinds of series:

* **Recorded** as things happen (counters and histograms): HTTP requests by route and status,
  503 rejections, tokens, time to first token, inter-token latency, request and load durations,
  loads / unloads by reason, load failures and runner crashes. The hot path only touches
  per-model children cached in :class:`ModelSeries` (one dict lookup, then ``inc``/``observe``).
* **Collected** at scrape time from the supervisor's scheduler snapshot (runner states, in-flight,
  queued, parallel slots, GPU memory) and from each ready runner's ``/health`` (KV-cache cells
  in use), which the ``/metrics`` handler polls right before rendering. Nothing of this runs
  per request.

For the Gateway API Inference Extension's endpoint picker the daemon also exports, as single
server-wide gauges, the model-server protocol's vLLM names: ``vllm:num_requests_waiting``
(TotalQueuedRequests), ``vllm:num_requests_running`` (TotalRunningRequests),
``vllm:kv_cache_usage_perc`` and its older name ``vllm:gpu_cache_usage_perc`` (KVCacheUtilization,
0..1), ``vllm:lora_requests_info`` (no adapters: empty adapter labels, value = scrape time) and
``vllm:cache_config_info`` (value 1; labels ``block_size`` 1, since llama.cpp reuses a cached
prefix to the token, and ``num_gpu_blocks``, the KV cells of the ready runners: the picker's
prefix-cache scorer sizes its index with them and raises the block size to its own minimum).
One series per family: the picker takes the first sample of a family, so per-model series there
would hide the others.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from corral.daemon.runner_client import RunnerClient
from corral.runner.protocol import KvCacheReport
from corral.scheduler import PRIORITIES, RunnerState

disable_created_metrics()  # no *_created series: half the output, nothing a dashboard reads

# The classic text format (every scraper, the endpoint picker's parser included, reads it; the
# names we use need no UTF-8 escaping, so the bytes are the same in format 1.0.0).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATES = tuple(RunnerState)
_LOADED = (RunnerState.READY, RunnerState.EXPIRING)
PRIORITY_NAMES = tuple(PRIORITIES)  # scheduler.Priority order
HEALTH_TIMEOUT = 0.5  # s per runner /health poll at scrape time

# Latency buckets (seconds). TTFT spans a warm runner (ms) to a cold load (minutes).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


KV_CACHE_COUNTERS = {
    "saves": "Prompt-cache prefixes saved by stopping runners.",
    "saved_bytes": "Bytes of the saved prompt-cache prefixes.",
    "restores": "Saved prefixes restored into a slot (hits).",
    "restored_tokens": "Prompt tokens restored instead of evaluated.",
    "restored_bytes": "Bytes read back into slots.",
    "misses": "Cold starts (nothing usable in the runner's slots) with nothing saved to restore.",
    "dropped": "Saved files refused and removed (corrupt, truncated, unloadable).",
    "failed_saves": "Saves given up (full disk, over the cap, stop deadline).",
}


class Source(Protocol):
    """What the scrape-time collector reads (the Supervisor has it)."""

    def snapshot(self) -> Any: ...
    def model_name(self, model_key: str) -> str: ...
    def gpu_name(self, gpu_id: str) -> str: ...
    def runner_clients(self) -> Mapping[str, RunnerClient]: ...
    def spare_memory(self) -> int: ...
    def spare_runners(self) -> tuple[int, int]: ...


class ModelSeries:
    """The per-model children of the recorded metrics (labels resolved once per model)."""

    __slots__ = ("prompt_tokens", "generated_tokens", "ttft", "itl", "duration")

    def __init__(self, m: Metrics, model: str) -> None:
        self.prompt_tokens = m.prompt_tokens.labels(model)
        self.generated_tokens = m.generated_tokens.labels(model)
        self.ttft = m.ttft.labels(model)
        self.itl = m.itl.labels(model)
        self.duration = m.request_duration.labels(model)


class Metrics:
    """One registry per daemon (tests run several daemons in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "corral_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.rejected = Counter(
            "corral_requests_rejected",
            "Requests answered 503 (queue full, shutting down).",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "corral_prompt_tokens",
            "Prompt tokens evaluated (a prompt-cache hit is not counted).",
            ["model"],
            registry=r,
        )
        self.generated_tokens = Counter(
            "corral_generated_tokens", "Tokens generated.", ["model"], registry=r
        )
        self.ttft = Histogram(
            "corral_time_to_first_token_seconds",
            "From the request's arrival (queueing and load included) to its first token.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "corral_inter_token_latency_seconds",
            "Time between two streamed pieces of one response, as the daemon forwards them.",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "corral_request_duration_seconds",
            "Completion requests from arrival to the final record.",
            ["model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "corral_queue_wait_seconds",
            "From a request's arrival to its slot (queueing and any load), by model and class.",
            ["model", "priority"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.cancelled = Counter(
            "corral_requests_cancelled",
            "Requests ended by DELETE /api/requests/{id}.",
            registry=r,
        )
        self.load_duration = Histogram(
            "corral_model_load_duration_seconds",
            "Runner start to Ready.",
            ["model"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "corral_model_loads",
            "Runner starts by reason: new, reload (options changed), oom_retry.",
            ["model", "reason"],
            registry=r,
        )
        self.load_failures = Counter(
            "corral_model_load_failures",
            "Loads that failed, by whether it was out of memory.",
            ["model", "oom"],
            registry=r,
        )
        self.unloads = Counter(
            "corral_model_unloads",
            "Runner stops by reason: expired, evicted, reload, unload, shutdown.",
            ["model", "reason"],
            registry=r,
        )
        self.crashes = Counter(
            "corral_runner_crashes",
            "Runners that exited without being asked after Ready.",
            ["model"],
            registry=r,
        )
        # saved prompt caches (runner/kvcache.py), as runners report them
        self.kv_cache = {
            name: Counter(f"corral_kv_cache_{name}", doc, ["model"], registry=r)
            for name, doc in KV_CACHE_COUNTERS.items()
        }
        # API keys (daemon/api/auth.py): by key name, never by key
        self.key_requests = Counter(
            "corral_key_requests",
            "Requests let in, by API key name.",
            ["key"],
            registry=r,
        )
        self.key_generated_tokens = Counter(
            "corral_key_generated_tokens",
            "Tokens generated for requests of an API key, by key name.",
            ["key"],
            registry=r,
        )
        self.key_limited = Counter(
            "corral_key_rate_limited",
            "Requests answered 429 by a key's per-minute limit (requests or tokens).",
            ["key", "limit"],
            registry=r,
        )
        self.auth_refused = Counter(
            "corral_auth_refused",
            "Requests refused by the API key check: missing, invalid (401), scope, model (403).",
            ["reason"],
            registry=r,
        )
        self.spare_runner_uses = Counter(
            "corral_spare_runner_uses",
            "Runner loads that started in a spare runner (imports done ahead).",
            registry=r,
        )
        self._models: dict[str, ModelSeries] = {}
        self._http: dict[tuple[str, str, str], Any] = {}
        self.source: Source | None = None
        self.kv: dict[str, tuple[int, int]] = {}  # runner id -> (cells used, cells total)
        r.register(_StateCollector(self))

    def count_kv_cache(self, model: str, report: KvCacheReport) -> None:
        for name, counter in self.kv_cache.items():
            n = getattr(report, name)
            if n:
                counter.labels(model).inc(n)

    def model(self, name: str) -> ModelSeries:
        series = self._models.get(name)
        if series is None:
            series = self._models[name] = ModelSeries(self, name)
        return series

    def count_request(self, route: str, method: str, status: str) -> None:
        child = self._http.get((route, method, status))
        if child is None:
            child = self._http[(route, method, status)] = self.http_requests.labels(
                route, method, status
            )
        child.inc()

    async def poll_runners(self) -> None:
        """Read every ready runner's /health (bounded); keep the KV-cache figures for collect.
        A runner that does not answer in time drops out of the KV figures of this scrape."""
        if self.source is None:
            self.kv = {}
            return
        clients = dict(self.source.runner_clients())
        results = await asyncio.gather(*(c.health(HEALTH_TIMEOUT) for c in clients.values()))
        self.kv = {
            rid: (h.kv_used, h.kv_total)
            for rid, h in zip(clients, results, strict=True)
            if h is not None and h.kv_total > 0
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _model_row() -> dict[str, Any]:
    """One model's sums in a scrape (runner states, in-flight, queued, slots, KV cells)."""
    return {
        "states": dict.fromkeys(STATES, 0),
        "in_flight": 0,
        "queued": 0,
        "slots": 0,
        "kv_used": 0,
        "kv_total": 0,
    }


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


class _StateCollector(Collector):
    """Scrape-time gauges from the scheduler snapshot and the last runner health poll."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> list[Metric]:
        return []  # collected on demand: registration must not call the supervisor

    def collect(self) -> Iterator[Metric]:
        src = self.m.source
        snap = src.snapshot() if src is not None else None
        runners = snap.runners if snap is not None else ()
        kv = self.m.kv

        state = _gauge("corral_model_runners", "Runners of a model by state.", ["model", "state"])
        loaded = _gauge("corral_model_loaded", "1 when a ready runner serves the model.", ["model"])
        in_flight = _gauge("corral_model_in_flight", "Granted requests being served.", ["model"])
        queued = _gauge("corral_model_queued", "Requests waiting for the model.", ["model"])
        slots = _gauge(
            "corral_model_parallel_slots", "Parallel sequences of the model's runners.", ["model"]
        )
        kv_ratio = _gauge(
            "corral_model_kv_cache_usage_ratio",
            "KV-cache cells held by running sequences / cells (runner /health).",
            ["model"],
        )
        per: defaultdict[str, dict[str, Any]] = defaultdict(_model_row)
        for v in runners:
            p = per[src.model_name(v.model_key) if src is not None else v.model_key]
            p["states"][v.state] = p["states"].get(v.state, 0) + 1
            p["in_flight"] += v.in_flight
            if v.state != RunnerState.STOPPING:
                p["slots"] += v.parallel
            used, cells = kv.get(v.runner_id, (0, 0))
            p["kv_used"] += used
            p["kv_total"] += cells
        waiting = dict(snap.waiting) if snap is not None else {}
        for key, n in waiting.items():
            per[src.model_name(key) if src is not None else key]["queued"] = n
        by_class = _gauge(
            "corral_model_queued_by_priority",
            "Requests waiting for the model, by the class they arrived with.",
            ["model", "priority"],
        )
        for key, counts in sorted(snap.waiting_classes.items() if snap is not None else ()):
            name = src.model_name(key) if src is not None else key
            for cls, n in zip(PRIORITY_NAMES, counts, strict=True):
                by_class.add_metric([name, cls], n)
        for name, p in sorted(per.items()):
            for st, n in p["states"].items():
                state.add_metric([name, st], n)
            loaded.add_metric(
                [name],
                1 if p["states"][RunnerState.READY] + p["states"][RunnerState.EXPIRING] else 0,
            )
            in_flight.add_metric([name], p["in_flight"])
            queued.add_metric([name], p["queued"])
            slots.add_metric([name], p["slots"])
            if p["kv_total"]:
                kv_ratio.add_metric([name], p["kv_used"] / p["kv_total"])
        yield from (state, loaded, in_flight, queued, by_class, slots, kv_ratio)

        total = _gauge("corral_gpu_memory_total_bytes", "GPU memory.", ["gpu", "gpu_name"])
        free = _gauge(
            "corral_gpu_memory_free_bytes", "GPU memory free as measured.", ["gpu", "gpu_name"]
        )
        reserved = _gauge(
            "corral_gpu_memory_reserved_bytes",
            "GPU memory reserved by corral's runners (incl. stopped ones not yet seen released).",
            ["gpu", "gpu_name"],
        )
        for g in snap.gpus if snap is not None else ():
            labels = [g.id, g.name]
            total.add_metric(labels, g.total)
            free.add_metric(labels, g.free)
            reserved.add_metric(labels, g.reserved)
        yield from (total, free, reserved)

        n_queued = snap.queued if snap is not None else 0
        n_running = snap.in_flight if snap is not None else 0
        yield _value("corral_queue_depth", "Requests waiting, all models.", n_queued)
        yield _value(
            "corral_requests_in_flight", "Granted requests being served, all models.", n_running
        )
        yield _value(
            "corral_spare_runner_resident_bytes",
            "Resident memory of the spare runners waiting for the next loads (0: none).",
            src.spare_memory() if src is not None else 0,
        )
        spares = _gauge(
            "corral_spare_runners",
            "Spare runners waiting for a load: warm (a load starts at once) or warming up.",
            ["state"],
        )
        warm, warming = src.spare_runners() if src is not None else (0, 0)
        spares.add_metric(["warm"], warm)
        spares.add_metric(["warming"], warming)
        yield spares
        yield _value(
            "corral_models_loaded",
            "Runners ready (or expiring).",
            sum(1 for v in runners if v.state in _LOADED),
        )
        used = sum(u for u, _ in kv.values())
        cells = sum(t for _, t in kv.values())
        usage = used / cells if cells else 0.0
        yield _value("vllm:num_requests_waiting", "Requests waiting (all models).", n_queued)
        yield _value("vllm:num_requests_running", "Requests being served (all models).", n_running)
        yield _value("vllm:kv_cache_usage_perc", "KV-cache usage, 1 = 100% (all runners).", usage)
        yield _value("vllm:gpu_cache_usage_perc", "KV-cache usage, 1 = 100% (older name).", usage)
        lora = _gauge(
            "vllm:lora_requests_info",
            "LoRA adapters (none): value = scrape time.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        lora.add_metric(["0", "", ""], time.time())
        yield lora
        cache = _gauge(
            "vllm:cache_config_info",
            "KV cache: tokens per block (llama.cpp caches per token), blocks (all runners).",
            ["block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        cache.add_metric(["1", str(cells), "True"], 1)
        yield cache


def _value(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


__all__ = ["CONTENT_TYPE", "Metrics", "ModelSeries"]
