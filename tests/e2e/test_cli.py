"""The ``corral`` command's client verbs against a real daemon, and its Ollama-style formats."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import ollama
import pytest

from corral.daemon.cli.main import human_bytes, human_time_ago, human_time_until, table
from tests.e2e.conftest import start_daemon
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (512, "512 B"),
        (1000, "1 KB"),
        (1500, "1.5 KB"),
        (274_000_000, "274 MB"),
        (4_700_000_000, "4.7 GB"),
        (12_345_678_901, "12 GB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "secs,text",
    [
        (0.5, "Less than a second ago"),
        (1, "1 second ago"),
        (30, "30 seconds ago"),
        (90, "About a minute ago"),
        (600, "10 minutes ago"),
        (4000, "About an hour ago"),
        (5 * 3600, "5 hours ago"),
        (3 * 86400, "3 days ago"),
        (20 * 86400, "2 weeks ago"),
        (100 * 86400, "3 months ago"),
        (800 * 86400, "2 years ago"),
    ],
)
def test_human_time_ago(secs, text):
    assert human_time_ago(NOW - dt.timedelta(seconds=secs), NOW) == text


def test_human_time_until():
    assert human_time_until(NOW + dt.timedelta(minutes=4, seconds=30), NOW) == "4 minutes from now"
    assert human_time_until(NOW - dt.timedelta(seconds=1), NOW) == "Stopping..."
    assert human_time_until(NOW + dt.timedelta(days=365 * 30), NOW) == "Forever"


def test_table_pads_columns_by_four():
    assert table([["NAME", "ID"], ["a:latest", "123"]]) == "NAME        ID\na:latest    123"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with start_daemon(tmp_path_factory.mktemp("cli")) as d:
        yield d


def corral(daemon, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OLLAMA_HOST": daemon.url.removeprefix("http://")}
    return subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )


def test_cli_create_list_show_run_ps_cp_rm(daemon, tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf", seed=3)
    (tmp_path / "Modelfile").write_text(
        "FROM ./tiny.gguf\nPARAMETER temperature 0\nPARAMETER num_predict 8\n"
        'SYSTEM """be brief"""\n'
    )
    r = corral(daemon, "create", "clitiny", "-f", str(tmp_path / "Modelfile"))
    assert r.returncode == 0, r.stderr
    assert "success" in r.stderr

    r = corral(daemon, "list")
    assert r.returncode == 0
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert rows[0].startswith("clitiny:latest")

    r = corral(daemon, "show", "clitiny")
    assert "architecture" in r.stdout and "llama" in r.stdout and "completion" in r.stdout
    assert corral(daemon, "show", "clitiny", "--system").stdout.strip() == "be brief"
    assert "FROM" in corral(daemon, "show", "clitiny", "--modelfile").stdout

    r = corral(daemon, "run", "clitiny", "hello", "--verbose")
    assert r.returncode == 0, r.stderr
    assert "eval count:" in r.stderr
    # what it printed is the model's answer: the same greedy generation through the API
    with ollama.Client(host=daemon.url) as c:
        expected = c.generate(model="clitiny", prompt="hello").response
    assert expected.strip() and r.stdout == expected + "\n"

    r = corral(daemon, "ps")
    header, *rows = r.stdout.splitlines()
    assert header.split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    assert rows and rows[0].startswith("clitiny:latest") and "100% CPU" in rows[0]

    assert corral(daemon, "stop", "clitiny").returncode == 0
    assert corral(daemon, "cp", "clitiny", "other").stdout.strip() == "copied 'clitiny' to 'other'"
    assert corral(daemon, "rm", "other").stdout.strip() == "deleted 'other'"
    r = corral(daemon, "rm", "other")
    assert r.returncode == 1 and r.stderr.startswith("Error: ")


def test_cli_reports_unreachable_server(tmp_path):
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.1:9"}
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "could not connect" in r.stderr


def test_cli_version():
    r = subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.startswith("corral version is ")
