"""Config from the environment: Ollama's envconfig tables (TestHost, TestOrigins, TestBool,
TestUint, TestKeepAlive, TestLoadTimeout, TestContextLength, TestLogLevel) plus corral's own
variables."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from corral.daemon.config import (
    DEFAULT_ORIGINS,
    FOREVER,
    TRACE,
    Config,
    SimulatedGpu,
    format_duration,
    keep_alive_from_json,
    parse_duration,
    parse_go_duration,
    parse_simulated_gpus,
    trim_var,
)


def cfg(**env: str) -> Config:
    return Config.from_env(env)


# -- TestHost ---------------------------------------------------------------------------------

HOST_CASES = {
    "empty": ("", "http://127.0.0.1:11434"),
    "only address": ("1.2.3.4", "http://1.2.3.4:11434"),
    "only port": (":1234", "http://:1234"),
    "address and port": ("1.2.3.4:1234", "http://1.2.3.4:1234"),
    "hostname": ("example.com", "http://example.com:11434"),
    "hostname and port": ("example.com:1234", "http://example.com:1234"),
    "zero port": (":0", "http://:0"),
    "too large port": (":66000", "http://:11434"),
    "too small port": (":-1", "http://:11434"),
    "ipv6 localhost": ("[::1]", "http://[::1]:11434"),
    "ipv6 world open": ("[::]", "http://[::]:11434"),
    "ipv6 no brackets": ("::1", "http://[::1]:11434"),
    "ipv6 + port": ("[::1]:1337", "http://[::1]:1337"),
    "extra space": (" 1.2.3.4 ", "http://1.2.3.4:11434"),
    "extra quotes": ('"1.2.3.4"', "http://1.2.3.4:11434"),
    "extra space+quotes": (' " 1.2.3.4 " ', "http://1.2.3.4:11434"),
    "extra single quotes": ("'1.2.3.4'", "http://1.2.3.4:11434"),
    "http": ("http://1.2.3.4", "http://1.2.3.4:80"),
    "http port": ("http://1.2.3.4:4321", "http://1.2.3.4:4321"),
    "https": ("https://1.2.3.4", "https://1.2.3.4:443"),
    "https port": ("https://1.2.3.4:4321", "https://1.2.3.4:4321"),
    "proxy path": ("https://example.com/ollama", "https://example.com:443/ollama"),
    "ollama.com": ("ollama.com", "https://ollama.com:443"),
    "0.0.0.0": ("0.0.0.0", "http://0.0.0.0:11434"),
}


@pytest.mark.parametrize(("value", "expect"), list(HOST_CASES.values()), ids=list(HOST_CASES))
def test_host(value: str, expect: str) -> None:
    assert cfg(OLLAMA_HOST=value).base_url == expect


def test_host_unset_is_default() -> None:
    c = Config.from_env({})
    assert c.base_url == "http://127.0.0.1:11434"
    assert (c.bind_host, c.bind_port) == ("127.0.0.1", 11434)


@pytest.mark.parametrize(
    ("value", "bind_host", "bind_port", "client"),
    [
        (":1234", None, 1234, "http://127.0.0.1:1234"),
        ("0.0.0.0", "0.0.0.0", 11434, "http://127.0.0.1:11434"),
        ("[::]:8080", "::", 8080, "http://[::1]:8080"),
        ("[::1]", "::1", 11434, "http://[::1]:11434"),
        ("example.com:99", "example.com", 99, "http://example.com:99"),
    ],
)
def test_bind_and_connectable_host(value, bind_host, bind_port, client) -> None:
    c = cfg(OLLAMA_HOST=value)
    assert (c.bind_host, c.bind_port, c.client_url) == (bind_host, bind_port, client)


def test_bad_port_warns_naming_variable() -> None:
    with capture_logs() as logs:
        c = cfg(OLLAMA_HOST=":66000")
    assert c.bind_port == 11434
    assert any(e.get("variable") == "OLLAMA_HOST" and e["log_level"] == "warning" for e in logs)


# -- TestOrigins ------------------------------------------------------------------------------

ORIGIN_CASES = [
    ("", []),
    ("http://10.0.0.1", ["http://10.0.0.1"]),
    ("http://172.16.0.1,https://192.168.0.1", ["http://172.16.0.1", "https://192.168.0.1"]),
    (
        "http://totally.safe,http://definitely.legit",
        ["http://totally.safe", "http://definitely.legit"],
    ),
    ("*", ["*"]),
    ("chrome-extension://*", ["chrome-extension://*"]),
]


@pytest.mark.parametrize(("value", "user"), ORIGIN_CASES)
def test_origins(value: str, user: list[str]) -> None:
    assert list(cfg(OLLAMA_ORIGINS=value).origins) == user + list(DEFAULT_ORIGINS)


def test_origin_defaults_are_the_17() -> None:
    assert DEFAULT_ORIGINS == (
        "http://localhost",
        "https://localhost",
        "http://localhost:*",
        "https://localhost:*",
        "http://127.0.0.1",
        "https://127.0.0.1",
        "http://127.0.0.1:*",
        "https://127.0.0.1:*",
        "http://0.0.0.0",
        "https://0.0.0.0",
        "http://0.0.0.0:*",
        "https://0.0.0.0:*",
        "app://*",
        "file://*",
        "tauri://*",
        "vscode-webview://*",
        "vscode-file://*",
    )


# -- TestBool ---------------------------------------------------------------------------------

BOOL_CASES = {
    "": False,
    "true": True,
    "false": False,
    "1": True,
    "0": False,
    "t": True,
    "T": True,
    "TRUE": True,
    "True": True,
    "f": False,
    "F": False,
    "FALSE": False,
    "False": False,
    "'false'": False,
    " true ": True,
    # invalid values are true
    "random": True,
    "something": True,
}


@pytest.mark.parametrize(("value", "expect"), BOOL_CASES.items())
def test_bool(value: str, expect: bool) -> None:
    c = cfg(OLLAMA_SCHED_SPREAD=value, OLLAMA_NOPRUNE=value)
    assert c.sched_spread is expect
    assert c.noprune is expect


@pytest.mark.parametrize(
    ("value", "expect"), [("", None), ("1", True), ("false", False), ("random", True)]
)
def test_flash_attention_bool_with_unset_default(value: str, expect: bool | None) -> None:
    assert cfg(OLLAMA_FLASH_ATTENTION=value).flash_attention is expect


# -- TestUint ---------------------------------------------------------------------------------

UINT_CASES = {
    "0": 0,
    "1": 1,
    "1337": 1337,
    # default values
    "": 11,
    "-1": 11,
    "0x10": 11,
    "0o10": 11,
    "8G": 11,
    "string": 11,
    "+1": 11,
}


@pytest.mark.parametrize(("value", "expect"), UINT_CASES.items())
def test_uint(value: str, expect: int) -> None:
    # OLLAMA_MAX_LOADED_MODELS has default 0 in Ollama; the table's default 11 is emulated by
    # comparing with the variable's own default when the value is invalid.
    c = cfg(OLLAMA_MAX_QUEUE=value, OLLAMA_MAX_LOADED_MODELS=value)
    default_q, default_m = 512, 0
    if expect == 11:
        assert (c.max_queue, c.max_loaded_models) == (default_q, default_m)
    else:
        assert (c.max_queue, c.max_loaded_models) == (expect, expect)


def test_uint_invalid_warns_naming_variable() -> None:
    with capture_logs() as logs:
        c = cfg(OLLAMA_GPU_OVERHEAD="8G")
    assert c.gpu_overhead == 0
    (event,) = [e for e in logs if e["log_level"] == "warning"]
    assert event["variable"] == "OLLAMA_GPU_OVERHEAD"
    assert event["value"] == "8G"


def test_num_parallel_zero_is_one() -> None:
    assert cfg(OLLAMA_NUM_PARALLEL="0").num_parallel == 1
    assert cfg(OLLAMA_NUM_PARALLEL="4").num_parallel == 4
    assert cfg().num_parallel == 1


# -- TestKeepAlive / TestLoadTimeout ----------------------------------------------------------

KEEP_ALIVE_CASES = {
    "": 300.0,
    "1s": 1.0,
    "1m": 60.0,
    "1h": 3600.0,
    "5m0s": 300.0,
    "1h2m3s": 3723.0,
    "0": 0.0,
    "60": 60.0,
    "120": 120.0,
    "3600": 3600.0,
    "-0": 0.0,
    "-1": FOREVER,
    "-1m": FOREVER,
    # invalid values
    " ": 300.0,
    "???": 300.0,
    "1d": 300.0,
    "1y": 300.0,
    "1w": 300.0,
    "1.5": 300.0,
}


@pytest.mark.parametrize(("value", "expect"), KEEP_ALIVE_CASES.items())
def test_keep_alive(value: str, expect: float) -> None:
    assert cfg(OLLAMA_KEEP_ALIVE=value).keep_alive == expect


LOAD_TIMEOUT_CASES = {
    "": 300.0,
    "1s": 1.0,
    "1m": 60.0,
    "1h": 3600.0,
    "5m0s": 300.0,
    "1h2m3s": 3723.0,
    "0": FOREVER,
    "60": 60.0,
    "120": 120.0,
    "3600": 3600.0,
    "-0": FOREVER,
    "-1": FOREVER,
    "-1m": FOREVER,
    " ": 300.0,
    "???": 300.0,
    "1d": 300.0,
    "1y": 300.0,
    "1w": 300.0,
}


@pytest.mark.parametrize(("value", "expect"), LOAD_TIMEOUT_CASES.items())
def test_load_timeout(value: str, expect: float) -> None:
    assert cfg(OLLAMA_LOAD_TIMEOUT=value).load_timeout == expect


def test_bad_keep_alive_warns_naming_variable() -> None:
    with capture_logs() as logs:
        c = cfg(OLLAMA_KEEP_ALIVE="1d")
    assert c.keep_alive == 300.0
    assert [e["variable"] for e in logs if e["log_level"] == "warning"] == ["OLLAMA_KEEP_ALIVE"]


# -- durations (shared with the API) ----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5m", 300.0),
        ("1h2m3s", 3723.0),
        ("1.5h", 5400.0),
        ("-1m", -60.0),
        ("0", 0.0),
        ("+5s", 5.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("300ms", 0.3),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("1ns", 1e-9),
        ("1h1h", 7200.0),
    ],
)
def test_parse_go_duration(value: str, seconds: float) -> None:
    assert parse_go_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("300", 'time: missing unit in duration "300"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("???", 'time: invalid duration "???"'),
        ("", 'time: invalid duration ""'),
        (".s", 'time: invalid duration ".s"'),
        ("-", 'time: invalid duration "-"'),
        ("3000000h", 'time: invalid duration "3000000h"'),
    ],
)
def test_parse_go_duration_errors_carry_go_text(value: str, message: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_go_duration(value)
    assert str(e.value) == message


@pytest.mark.parametrize(
    ("value", "expect"),
    [("300", 300.0), ("-1", -1.0), ("5m", 300.0), ("1.5", None), ("", None), (None, None)],
)
def test_parse_duration_env_rule(value, expect) -> None:
    assert parse_duration(value) == expect


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        (None, None),
        (42.5, 42.5),
        (0, 0.0),
        (-1, FOREVER),
        ("42m", 2520.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("-1m", FOREVER),
    ],
)
def test_keep_alive_from_json(value, expect) -> None:
    assert keep_alive_from_json(value) == expect


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("300", 'time: missing unit in duration "300"'),
        (True, "Unsupported type: 'bool'"),
        ([1], "Unsupported type: '[]interface {}'"),
    ],
)
def test_keep_alive_from_json_errors(value, message) -> None:
    with pytest.raises(ValueError, match=r"^" + __import__("re").escape(message) + "$"):
        keep_alive_from_json(value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (300.0, "5m0s"),
        (3723.0, "1h2m3s"),
        (0.0, "0s"),
        (1.5, "1.5s"),
        (0.5, "500ms"),
        (1e-6, "1µs"),
        (2e-9, "2ns"),
        (-60.0, "-1m0s"),
        (FOREVER, "2562047h47m16.854775807s"),
        (7200.0, "2h0m0s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- TestContextLength ------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expect"), [("", 0), ("2048", 2048), ("0", 0), ("x", 0)])
def test_context_length(value: str, expect: int) -> None:
    assert cfg(OLLAMA_CONTEXT_LENGTH=value).context_length == expect


# -- TestLogLevel -----------------------------------------------------------------------------

LOG_LEVEL_CASES = {
    "": logging.INFO,
    "false": logging.INFO,
    "f": logging.INFO,
    "0": logging.INFO,
    "true": logging.DEBUG,
    "t": logging.DEBUG,
    "1": logging.DEBUG,
    "2": TRACE,
    "-1": logging.WARNING,
    "-2": logging.ERROR,
    "random": logging.INFO,
}


@pytest.mark.parametrize(("value", "expect"), LOG_LEVEL_CASES.items())
def test_log_level(value: str, expect: int) -> None:
    assert cfg(OLLAMA_DEBUG=value).log_level == expect


# -- TestVar and the rest ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expect"),
    [
        ("value", "value"),
        (" value ", "value"),
        (" 'value' ", "value"),
        ('"value"', "value"),
        (" ' value ' ", " value "),
        (' " value " ', " value "),
        (None, ""),
    ],
)
def test_var_trimming(raw, expect) -> None:
    assert trim_var(raw) == expect


def test_models_path(tmp_path: Path) -> None:
    assert cfg(HOME=str(tmp_path)).models == tmp_path / ".ollama" / "models"
    assert cfg(OLLAMA_MODELS="/srv/models").models == Path("/srv/models")


def test_kv_cache_type_lowercased() -> None:
    assert cfg(OLLAMA_KV_CACHE_TYPE="Q8_0").kv_cache_type == "q8_0"
    assert cfg().kv_cache_type == ""


def test_cuda_visible_devices_passthrough() -> None:
    assert cfg(CUDA_VISIBLE_DEVICES="0,1").cuda_visible_devices == "0,1"
    assert cfg().cuda_visible_devices is None


def test_corral_variables() -> None:
    c = cfg(
        CORRAL_LOG_FORMAT="json",
        CORRAL_EVENT_LOOP="AsyncIO",
        CORRAL_RUNNER_ENGINE="fake",
        CORRAL_SIMULATE_GPUS='[{"id":"0","name":"Sim A100","total":85899345920,'
        '"free":85899345920,"library":"cuda","integrated":false}]',
        CORRAL_FAKE_KNOBS='{"load_seconds": 0.1}',
    )
    assert c.log_format == "json"
    assert c.event_loop == "asyncio"
    assert cfg().event_loop == "auto"
    assert c.runner_engine == "fake"
    assert c.simulate_gpus == (
        SimulatedGpu(
            id="0",
            name="Sim A100",
            total=85899345920,
            free=85899345920,
            library="cuda",
            integrated=False,
        ),
    )
    assert c.fake_knobs == {"load_seconds": 0.1}
    assert cfg(CORRAL_SIMULATE_GPUS="[]").simulate_gpus == ()
    assert cfg().simulate_gpus is None


@pytest.mark.parametrize(
    ("name", "value", "field", "default"),
    [
        ("CORRAL_LOG_FORMAT", "xml", "log_format", "text"),
        ("CORRAL_EVENT_LOOP", "trio", "event_loop", "auto"),
        ("CORRAL_RUNNER_ENGINE", "vllm", "runner_engine", "llama"),
        ("CORRAL_FAKE_KNOBS", "[1]", "fake_knobs", None),
    ],
)
def test_bad_corral_values_warn_and_default(name, value, field, default) -> None:
    with capture_logs() as logs:
        c = cfg(**{name: value})
    assert getattr(c, field) == default
    assert [e["variable"] for e in logs if e["log_level"] == "warning"] == [name]


GiB = 1 << 30


def test_simulated_gpus_sizes_with_units_and_free_optional() -> None:
    got = parse_simulated_gpus(
        '[{"name": "Sim 24", "total": "24GiB", "free": "20 GiB"},'
        ' {"total": 8589934592}, {"id": "x", "total": "1.5GB", "free": 0,'
        ' "library": "ROCm", "integrated": true}]'
    )
    assert got == (
        SimulatedGpu(id="0", name="Sim 24", total=24 * GiB, free=20 * GiB),
        SimulatedGpu(id="1", name="Simulated GPU 1", total=8 * GiB, free=8 * GiB),
        SimulatedGpu(
            id="x",
            name="Simulated GPU 2",
            total=1_500_000_000,
            free=0,
            library="rocm",
            integrated=True,
        ),
    )
    assert parse_simulated_gpus([{"total": 512 << 20}]) == parse_simulated_gpus(
        '[{"total":"512MiB"}]'
    )
    assert parse_simulated_gpus(got) == got  # already parsed: unchanged
    assert cfg(CORRAL_SIMULATE_GPUS='[{"total": "2 GiB"}]').simulate_gpus == (
        SimulatedGpu(id="0", name="Simulated GPU 0", total=2 * GiB, free=2 * GiB),
    )


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("[{", "CORRAL_SIMULATE_GPUS: not JSON: "),
        ('{"total": 1}', "CORRAL_SIMULATE_GPUS: expected a JSON list of GPUs, got dict"),
        ("[8]", "CORRAL_SIMULATE_GPUS[0]: expected an object, got 8"),
        ('[{"id": "0"}]', "CORRAL_SIMULATE_GPUS[0].total: missing"),
        (
            '[{"total": 1}, {"total": "24 GiBs"}]',
            "CORRAL_SIMULATE_GPUS[1].total: '24 GiBs' is not a size",
        ),
        ('[{"total": 1, "free": 2}]', "CORRAL_SIMULATE_GPUS[0].free: 2 is more than total 1"),
        ('[{"total": 1, "free": -1}]', "CORRAL_SIMULATE_GPUS[0].free: -1 is not a size"),
        ('[{"total": 0}]', "CORRAL_SIMULATE_GPUS[0].total: must be more than 0"),
        ('[{"total": true}]', "CORRAL_SIMULATE_GPUS[0].total: True is not a size"),
        ('[{"total": 1, "vram": 1}]', "CORRAL_SIMULATE_GPUS[0].vram: unknown field"),
        (
            '[{"total": 1, "integrated": "yes"}]',
            "CORRAL_SIMULATE_GPUS[0].integrated: expected true",
        ),
    ],
)
def test_bad_simulated_gpus_name_the_item_and_field(value, error) -> None:
    with pytest.raises(ValueError) as e:
        parse_simulated_gpus(value)
    assert str(e.value).startswith(error)
    c = cfg(CORRAL_SIMULATE_GPUS=value)  # from_env never raises: serve stops on it
    assert c.startup_error == str(e.value) and c.simulate_gpus is None
    assert cfg().startup_error is None


def test_config_is_frozen() -> None:
    c = cfg()
    with pytest.raises(AttributeError):
        c.max_queue = 1  # type: ignore[misc]


def test_env_summary_prints_forever_like_ollama() -> None:
    s = cfg(OLLAMA_KEEP_ALIVE="-1").env_summary()
    assert s["OLLAMA_KEEP_ALIVE"] == "2562047h47m16.854775807s"
    assert math.isinf(cfg(OLLAMA_KEEP_ALIVE="-1").keep_alive)


def test_serve_stops_on_a_bad_simulated_gpu_list(tmp_path: Path) -> None:
    """A typo in CORRAL_SIMULATE_GPUS stops `corral serve` with the message, before it binds or
    probes anything (it used to warn and silently probe the real GPUs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env.update(
        OLLAMA_HOST="127.0.0.1:0",
        OLLAMA_MODELS=str(tmp_path),
        CORRAL_DEFAULT_MODEL="",
        CORRAL_SIMULATE_GPUS='[{"total": "24GB"}, {"total": "8GB", "free": "9GB"}]',
    )
    out = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 1
    assert (
        "CORRAL_SIMULATE_GPUS[1].free: 9000000000 is more than total 8000000000"
        in out.stderr + out.stdout
    )
    assert "Listening" not in out.stderr + out.stdout


def test_kv_cache_settings() -> None:
    c = cfg(OLLAMA_MODELS="/store")
    assert c.kv_cache_path == Path("/store/kvcache")  # beside the store by default
    assert (c.kv_cache_size, c.kv_cache_memory) == (8 << 30, 2 << 30)
    c = cfg(
        CORRAL_KV_CACHE_DIR="/fast/kv", CORRAL_KV_CACHE_SIZE="20GiB", CORRAL_KV_CACHE_MEMORY="0"
    )
    assert (c.kv_cache_path, c.kv_cache_size, c.kv_cache_memory) == (Path("/fast/kv"), 20 << 30, 0)
    assert c.env_summary()["CORRAL_KV_CACHE_SIZE"] == str(20 << 30)
    assert cfg(CORRAL_KV_CACHE_SIZE="lots").kv_cache_size == 8 << 30  # warned, default kept
