"""systemd/install.sh and launchd/install.sh, run for real against temporary roots.

systemd: the script adds the ``corral`` user to ``ROOT/etc/passwd`` (``useradd --prefix``),
creates the store, installs the unit and enables it with ``systemctl --root`` (symlinks only);
the machine's own /etc and units are compared before and after. ``systemd-analyze verify``
checks the installed unit where systemd is present. launchd: the agent is written under a
temporary home and parsed with ``plistlib``; ``launchctl`` is a recording stand-in on PATH.
"""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from corral.daemon.serve import SHUTDOWN_BUDGET

REPO = Path(__file__).resolve().parents[2]
SYSTEMD_INSTALL = REPO / "systemd" / "install.sh"
LAUNCHD_INSTALL = REPO / "launchd" / "install.sh"
PLIST = REPO / "launchd" / "com.corral.serve.plist"


def fake_prefix(tmp: Path) -> Path:
    """A checkout after `./dev install`: .venv/bin/corral (executable) and .venv/bin/python."""
    prefix = tmp / "opt corral"  # a space: paths must survive quoting
    bin_dir = prefix / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    exe = bin_dir / "corral"
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    (bin_dir / "python").symlink_to(sys.executable)
    return prefix


def run(*argv: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *map(str, argv)], capture_output=True, text=True, timeout=60, env=env
    )


def system_state() -> dict[str, object]:
    """What a real install would change on this machine."""
    state: dict[str, object] = {}
    for f in ("/etc/passwd", "/etc/group"):
        state[f] = Path(f).read_bytes() if Path(f).exists() else None
    state["unit"] = Path("/etc/systemd/system/corral.service").exists()
    state["home"] = Path("/var/lib/corral").exists()
    return state


# ---- systemd -----------------------------------------------------------------------------------

needs_tools = pytest.mark.skipif(
    not (shutil.which("useradd") and shutil.which("systemctl")),
    reason="useradd and systemctl are needed to run systemd/install.sh (not a systemd Linux)",
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty system root with the account files useradd --prefix edits."""
    root = tmp_path / "root"
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for f in ("shadow", "gshadow"):
        (etc / f).chmod(0o600)
    return root


@needs_tools
def test_systemd_install_into_a_temporary_root(tmp_path: Path, root: Path):
    prefix = fake_prefix(tmp_path)
    before = system_state()
    res = run(SYSTEMD_INSTALL, "--prefix", prefix, "--root", root)
    assert res.returncode == 0, res.stderr
    assert system_state() == before  # nothing outside the root changed

    users = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    corral = [u for u in users if u[0] == "corral"]
    assert len(corral) == 1
    _, _, uid, gid, _, home, shell = corral[0]
    assert home == "/var/lib/corral" and shell == "/usr/sbin/nologin"
    assert any(g.startswith(f"corral:x:{gid}:") for g in (root / "etc/group").read_text().split())
    store = root / "var/lib/corral/models"
    assert store.is_dir()
    assert (store.stat().st_uid, store.stat().st_gid) == (int(uid), int(gid))

    unit = root / "etc/systemd/system/corral.service"
    installed = unit.read_text().splitlines()
    template = (REPO / "systemd/corral.service").read_text().splitlines()
    assert f'ExecStart="{prefix}/.venv/bin/corral" serve' in installed
    # Only ExecStart differs from the unit in the repository.
    assert [a for a, b in zip(installed, template, strict=True) if a != b] == [
        f'ExecStart="{prefix}/.venv/bin/corral" serve'
    ] and len(installed) == len(template)
    wants = root / "etc/systemd/system/multi-user.target.wants/corral.service"
    assert wants.is_symlink()
    assert "systemctl edit corral" in res.stdout and "OLLAMA_" in res.stdout

    again = run(SYSTEMD_INSTALL, "--prefix", prefix, "--root", root)  # idempotent
    assert again.returncode == 0, again.stderr
    assert (root / "etc/passwd").read_text().count("\ncorral:") == 1


@needs_tools
def test_systemd_analyze_verify_accepts_the_installed_unit(tmp_path: Path, root: Path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    prefix = fake_prefix(tmp_path)
    assert run(SYSTEMD_INSTALL, "--prefix", prefix, "--root", root).returncode == 0
    res = subprocess.run(
        ["systemd-analyze", "verify", str(root / "etc/systemd/system/corral.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "corral.service" not in res.stderr.replace(str(root), "")  # no complaint about it
    unit = (root / "etc/systemd/system/corral.service").read_text()
    stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
    assert stop > SHUTDOWN_BUDGET


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_is_sandboxed_to_its_store_and_the_gpus():
    unit = unit_settings((REPO / "systemd/corral.service").read_text())
    store = [v for v in unit["Environment"] if "OLLAMA_MODELS=" in v][0].split("=", 1)[1]
    home = [v for v in unit["Environment"] if "HOME=" in v][0].split("=", 1)[1].strip('"')
    writable = unit["ReadWritePaths"][0].split()
    assert any(store.strip('"').startswith(w + "/") for w in writable) and home in writable
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DevicePolicy": "closed",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
    }.items():
        assert unit[key] == [value], key
    assert {"char-nvidia* rw", "char-drm rw", "char-kfd rw"} <= set(unit["DeviceAllow"])
    assert "MemoryDenyWriteExecute" not in unit and "PrivateDevices" not in unit


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_systemd_analyze_security_rates_the_unit_ok():
    res = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(REPO / "systemd/corral.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in res.stderr:
        pytest.skip(f"systemd-analyze too old for --offline: {res.stderr.strip()}")
    score = re.search(r"Overall exposure level for corral\.service: ([\d.]+) (\w+)", res.stdout)
    assert score, res.stdout[-500:] + res.stderr
    assert float(score.group(1)) <= 2.0 and score.group(2) == "OK", score.group(0)


@needs_tools
@pytest.mark.skipif(not os.access("/home", os.W_OK), reason="needs a writable /home")
def test_a_checkout_under_home_keeps_it_readable(root: Path):
    home_dir = Path(tempfile.mkdtemp(dir="/home", prefix="corral-test-"))
    try:
        prefix = fake_prefix(home_dir)
        res = run(SYSTEMD_INSTALL, "--prefix", prefix, "--root", root)
        assert res.returncode == 0, res.stderr
        unit = unit_settings((root / "etc/systemd/system/corral.service").read_text())
        assert unit["ProtectHome"] == ["read-only"]
        assert unit["ExecStart"] == [f'"{prefix}/.venv/bin/corral" serve']
    finally:
        shutil.rmtree(home_dir)


def test_systemd_install_refuses_without_an_installed_checkout(tmp_path: Path, root: Path):
    res = run(SYSTEMD_INSTALL, "--prefix", tmp_path, "--root", root)
    assert res.returncode == 1
    assert "run ./dev install" in res.stderr
    assert not (root / "etc/systemd").exists()


# ---- launchd -----------------------------------------------------------------------------------


def test_plist_in_the_repository_parses():
    with PLIST.open("rb") as f:
        agent = plistlib.load(f)
    assert agent["Label"] == "com.corral.serve"
    assert agent["ProgramArguments"][1:] == ["serve"]
    assert agent["RunAtLoad"] is True and agent["KeepAlive"] is True
    assert agent["ExitTimeOut"] > SHUTDOWN_BUDGET
    assert "EnvironmentVariables" not in agent  # launchctl setenv values are not overridden


@pytest.mark.parametrize("load", [False, True])
def test_launchd_install_writes_and_loads_the_agent(tmp_path: Path, load: bool):
    prefix = fake_prefix(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "launchctl.calls"
    shims = tmp_path / "shims"
    shims.mkdir()
    shim = shims / "launchctl"
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    shim.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{shims}:{os.environ['PATH']}"}
    args = ["--prefix", prefix] + ([] if load else ["--no-load"])
    res = run(LAUNCHD_INSTALL, *args, env=env)
    assert res.returncode == 0, res.stderr

    plist = home / "Library/LaunchAgents/com.corral.serve.plist"
    with plist.open("rb") as f:
        agent = plistlib.load(f)
    with PLIST.open("rb") as f:
        template = plistlib.load(f)
    log = str(home / "Library/Logs/corral.log")
    assert agent == {
        **template,
        "ProgramArguments": [f"{prefix}/.venv/bin/corral", "serve"],
        "StandardErrorPath": log,
        "StandardOutPath": log,
    }
    assert "launchctl setenv OLLAMA_HOST" in res.stdout
    uid = os.getuid()
    if load:
        assert calls.read_text().splitlines() == [
            f"bootout gui/{uid}/com.corral.serve",
            f"bootstrap gui/{uid} {plist}",
            f"enable gui/{uid}/com.corral.serve",
        ]
    else:
        assert not calls.exists()
