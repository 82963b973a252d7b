"""HTTPS and API keys on a real ``corral serve`` (issue 19, points 4 and 6): a certificate
authority made here with the ``openssl`` command, the real ``ollama``, ``openai`` and
``anthropic`` clients and the ``corral`` command over HTTPS with keys, and SIGHUP reloading the
key file and the certificate without a restart. The runner is the FakeEngine over the tiny
model's GGUF (the transport is under test, not the model)."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import httpx2
import ollama
import openai
import pytest

from corral.daemon.apikeys import ApiKey, entry_toml, hash_secret, new_secret
from tests.e2e.conftest import Daemon, start_daemon, wait_until
from tests.fixtures.tiny_gguf import write_tiny_llama

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

ADMIN, USER = new_secret(), new_secret()


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    openssl(
        *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
        *("-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2"),
        *("-subj", "/CN=corral test CA"),
        cwd=d,
    )
    return d / "ca.pem"


def make_server_cert(d: Path, name: str) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by the CA in ``d``; its CN is ``name``."""
    (d / f"{name}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        *("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}"),
        cwd=d,
    )
    openssl(
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
        *("-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext"),
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


def served_cn(url: str, ca: Path) -> str:
    """The common name of the certificate a new connection to ``url`` is shown."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            cert = s.getpeercert()
    assert cert is not None
    return dict(x[0] for x in cert["subject"])["commonName"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("pki")
    return make_ca(d), d


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(
        entry_toml(ApiKey(name="ops", sha256=hash_secret(ADMIN), scope="admin"))
        + entry_toml(ApiKey(name="app", sha256=hash_secret(USER), models=("tiny",)))
    )
    return keys


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, pki: tuple[Path, Path], keys_file: Path):
    ca, d = pki
    cert, key = make_server_cert(d, "first")
    tmp = tmp_path_factory.mktemp("tls-daemon")
    with start_daemon(
        tmp,
        scheme="https",
        CORRAL_TLS_CERT=str(cert),
        CORRAL_TLS_KEY=str(key),
        CORRAL_API_KEYS_FILE=str(keys_file),
        CORRAL_RUNNER_ENGINE="fake",
        CORRAL_FAKE_KNOBS=json.dumps({"tokens_per_second": 500.0}),
    ) as dmn:
        path = write_tiny_llama(tmp / "tiny.gguf", seed=3)
        with ollama.Client(host=dmn.url, verify=verify(ca), headers=auth(ADMIN)) as c:
            c.create(model="tiny", files={"tiny.gguf": c.create_blob(path)})
        yield dmn


def verify(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_plain_http_is_not_served(daemon: Daemon) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(daemon.url.replace("https://", "http://") + "/api/version", timeout=10)


def test_ollama_client_over_tls(daemon: Daemon, pki: tuple[Path, Path]) -> None:
    ca, _ = pki
    with ollama.Client(host=daemon.url, verify=verify(ca), headers=auth(USER)) as c:
        r = c.generate(model="tiny", prompt="hi", options={"num_predict": 4})
        assert r.done and r.eval_count == 4
        chunks = list(
            c.chat(
                model="tiny",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                options={"num_predict": 3},
            )
        )
        assert chunks[-1].done and chunks[-1].eval_count == 3
        with pytest.raises(ollama.ResponseError) as err:
            c.delete("tiny")  # an inference key
        assert err.value.status_code == 403
    with ollama.Client(host=daemon.url, verify=verify(ca)) as c:
        with pytest.raises(ollama.ResponseError) as err:
            c.list()
        assert err.value.status_code == 401
    # a client that does not trust the CA does not get in
    with ollama.Client(host=daemon.url, headers=auth(USER)) as c:
        with pytest.raises(ConnectionError):  # ollama's text for httpx.ConnectError
            c.list()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(daemon.url + "/api/tags", headers=auth(USER), timeout=10)


def test_openai_and_anthropic_clients_over_tls(daemon: Daemon, pki: tuple[Path, Path]) -> None:
    ca, _ = pki
    with openai.OpenAI(
        base_url=daemon.url + "/v1",
        api_key=USER,
        max_retries=0,
        http_client=httpx2.Client(verify=verify(ca)),
    ) as oa:
        r = oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert r.usage is not None and r.usage.completion_tokens == 4
        stream = oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
        )
        assert any(c.choices and c.choices[0].finish_reason for c in stream)
    with openai.OpenAI(
        base_url=daemon.url + "/v1",
        api_key="corral-wrong",
        max_retries=0,
        http_client=httpx2.Client(verify=verify(ca)),
    ) as oa:
        with pytest.raises(openai.AuthenticationError):
            oa.models.list()
    with anthropic.Anthropic(
        base_url=daemon.url,
        api_key=USER,
        max_retries=0,
        http_client=httpx2.Client(verify=verify(ca)),
    ) as claude:
        msg = claude.messages.create(
            model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.usage.output_tokens == 4
        with pytest.raises(anthropic.PermissionDeniedError):
            claude.messages.create(
                model="other", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )


def corral(daemon: Daemon, ca: Path, *args: str, key: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    env |= {"OLLAMA_HOST": daemon.url, "SSL_CERT_FILE": str(ca)}
    if key is not None:
        env["OLLAMA_API_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "corral.daemon.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_corral_command_sends_ollama_api_key_over_tls(
    daemon: Daemon, pki: tuple[Path, Path]
) -> None:
    ca, _ = pki
    listed = corral(daemon, ca, "list", key=USER)
    assert listed.returncode == 0 and "tiny:latest" in listed.stdout, listed.stderr
    refused = corral(daemon, ca, "list", key=None)
    assert refused.returncode == 1 and "missing API key" in refused.stderr
    copied = corral(daemon, ca, "cp", "tiny", "tiny2", key=USER)
    assert copied.returncode == 1 and "needs 'admin'" in copied.stderr
    assert corral(daemon, ca, "cp", "tiny", "tiny2", key=ADMIN).returncode == 0
    assert corral(daemon, ca, "rm", "tiny2", key=ADMIN).returncode == 0
    # the audit lines name the key, never the key itself
    assert wait_until(lambda: daemon.log_text().count("audit") >= 3)
    log = daemon.log_text()
    assert "key=ops" in log and ADMIN not in log and USER not in log


def test_sighup_reloads_keys_and_certificate(
    daemon: Daemon, pki: tuple[Path, Path], keys_file: Path
) -> None:
    ca, d = pki
    assert served_cn(daemon.url, ca) == "first"
    cert, key = make_server_cert(d, "second")
    fresh = new_secret()
    keys_file.write_text(
        keys_file.read_text() + entry_toml(ApiKey(name="fresh", sha256=hash_secret(fresh)))
    )
    # the certificate files are replaced in place, as certbot or cert-manager do
    first_cert, first_key = d / "first.pem", d / "first.key"
    first_cert.write_bytes(cert.read_bytes())
    first_key.write_bytes(key.read_bytes())
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "TLS certificate reloaded" in daemon.log_text())
    assert "API keys reloaded" in daemon.log_text()
    assert served_cn(daemon.url, ca) == "second"
    with ollama.Client(host=daemon.url, verify=verify(ca), headers=auth(fresh)) as c:
        assert [m.model for m in c.list().models] == ["tiny:latest"]
    # a broken pair keeps the certificate that works; the daemon keeps serving
    first_key.write_text("not a key")
    daemon.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "TLS certificate not reloaded" in daemon.log_text())
    assert daemon.proc.poll() is None
    assert served_cn(daemon.url, ca) == "second"


def test_https_without_certificate_or_bad_key_file_does_not_start(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
    cases = [
        {"OLLAMA_HOST": "https://127.0.0.1:0"},
        {"OLLAMA_HOST": "127.0.0.1:0", "CORRAL_TLS_CERT": "c.pem", "CORRAL_TLS_KEY": "k.pem"},
        {"OLLAMA_HOST": "https://127.0.0.1:0", "CORRAL_TLS_CERT": "c.pem"},
        {"OLLAMA_HOST": "https://127.0.0.1:0", "CORRAL_TLS_CERT": "c.pem", "CORRAL_TLS_KEY": "k"},
        {"OLLAMA_HOST": "127.0.0.1:0", "CORRAL_API_KEYS_FILE": str(tmp_path / "none.toml")},
    ]
    for case in cases:
        r = subprocess.run(
            [sys.executable, "-m", "corral.daemon.cli", "serve"],
            env=env | {"OLLAMA_MODELS": str(tmp_path / "m"), "CORRAL_DEFAULT_MODEL": ""} | case,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 1 and "serve failed" in r.stderr, (case, r.stderr)
        assert "Listening" not in r.stderr
