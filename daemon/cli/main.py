"""The ``corral`` command: ``serve`` runs the daemon; the other verbs are Ollama-style clients.

Client verbs talk HTTP to the daemon at ``OLLAMA_HOST`` (as ``ollama`` does), print errors as
``Error: <message>`` on stderr and exit 1. Output goes to stdout through :func:`out`; the daemon
itself logs only through structlog.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import hashlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from corral.daemon import boot
from corral.daemon.apikeys import (
    SCOPES,
    ApiKey,
    KeyFileError,
    add_key,
    hash_secret,
    new_secret,
)
from corral.daemon.cli import doctor
from corral.daemon.cli.interactive import (
    Progress,
    ReplyPrinter,
    Session,
    extract_images,
    repl,
    think_value,
)
from corral.daemon.cli.output import CliError, human_bytes, out, print_metrics, print_show, write
from corral.daemon.config import Config
from corral.daemon.logging import configure
from corral.daemon.models.modelfile import ModelfileError, parse
from corral.daemon.version import VERSION

# ---------------------------------------------------------------- formatting (Ollama's CLI formats)


def human_time_ago(then: _dt.datetime, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.UTC)
    secs = (now - then).total_seconds()
    return _human_duration(secs) + " ago" if secs >= 1 else "Less than a second ago"


def human_time_until(then: _dt.datetime, now: _dt.datetime | None = None) -> str:
    now = now or _dt.datetime.now(_dt.UTC)
    secs = (then - now).total_seconds()
    if secs > 20 * 365 * 86400:
        return "Forever"
    if secs <= 0:
        return "Stopping..."
    if secs < 1:
        return "Less than a second from now"
    return _human_duration(secs) + " from now"


def _human_duration(secs: float) -> str:
    def plural(n: int, unit: str) -> str:
        return f"{n} {unit}" + ("" if n == 1 else "s")

    if secs < 60:
        return plural(int(secs), "second")
    minutes = secs / 60
    if minutes < 2:
        return "About a minute"
    if minutes < 60:
        return plural(int(minutes), "minute")
    hours = minutes / 60
    if hours < 2:
        return "About an hour"
    if hours < 48:
        return plural(int(hours), "hour")
    days = hours / 24
    if days < 14:
        return plural(int(days), "day")
    if days < 60:
        return plural(int(days / 7), "week")
    if days < 730:
        return plural(int(days / 30), "month")
    return plural(int(days / 365), "year")


def table(rows: list[list[str]]) -> str:
    """Ollama's borderless table: columns padded to the widest cell plus 4 spaces."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i] + 4) if i < len(row) - 1 else c for i, c in enumerate(row)]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def _parse_time(value: str) -> _dt.datetime:
    return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------- HTTP client helpers


class Client:
    """HTTP to the daemon; ``api_key`` (OLLAMA_API_KEY) goes with every request as
    ``Authorization: Bearer``, as the ollama clients send it."""

    def __init__(self, base_url: str, api_key: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5), headers=self._headers
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        assert self._session is not None
        try:
            async with self._session.request(method, self.base_url + path, json=body) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise CliError(_error_text(text, resp.status))
                return json.loads(text) if text.strip() else None
        except aiohttp.ClientConnectionError as exc:
            raise CliError(
                "could not connect to corral server, run 'corral serve' to start it"
            ) from exc

    async def stream(self, path: str, body: Any) -> AsyncIterator[dict]:
        assert self._session is not None
        try:
            async with self._session.post(self.base_url + path, json=body) as resp:
                if resp.status >= 400:
                    raise CliError(_error_text(await resp.text(), resp.status))
                async for raw in resp.content:
                    line = raw.strip()
                    if not line:
                        continue
                    obj = json.loads(line)
                    if "error" in obj:
                        raise CliError(obj["error"])
                    yield obj
        except aiohttp.ClientConnectionError as exc:
            raise CliError(
                "could not connect to corral server, run 'corral serve' to start it"
            ) from exc

    async def upload_blob(self, path: Path) -> str:
        assert self._session is not None
        digest = "sha256:" + await asyncio.to_thread(_sha256_file, path)
        async with self._session.head(f"{self.base_url}/api/blobs/{digest}") as resp:
            if resp.status == 200:
                return digest
        with path.open("rb") as fh:
            async with self._session.post(f"{self.base_url}/api/blobs/{digest}", data=fh) as resp:
                if resp.status >= 400:
                    raise CliError(_error_text(await resp.text(), resp.status))
        return digest


def _error_text(text: str, status: int) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            err = err.get("message")
        if err:
            return str(err)
    except (ValueError, AttributeError):
        pass
    return text.strip() or f"HTTP {status}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- verbs


async def cmd_list(c: Client, args: argparse.Namespace) -> None:
    models = (await c.request("GET", "/api/tags"))["models"]
    rows = [["NAME", "ID", "SIZE", "MODIFIED"]]
    for m in models:
        if args.prefix and not m["name"].startswith(args.prefix):
            continue
        rows.append(
            [
                m["name"],
                m["digest"][:12],
                human_bytes(m["size"]),
                human_time_ago(_parse_time(m["modified_at"])),
            ]
        )
    out(table(rows))


async def cmd_ps(c: Client, args: argparse.Namespace) -> None:
    models = (await c.request("GET", "/api/ps"))["models"]
    rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
    for m in models:
        size, vram = m.get("size", 0), m.get("size_vram", 0)
        if size == 0:
            proc = "Unknown"
        elif vram >= size:
            proc = "100% GPU"
        elif vram == 0:
            proc = "100% CPU"
        else:
            gpu = round(vram * 100 / size)
            proc = f"{100 - gpu}%/{gpu}% CPU/GPU"
        until = human_time_until(_parse_time(m["expires_at"])) if m.get("expires_at") else ""
        if m.get("state") == "loading":
            until = "Loading..."
        rows.append(
            [
                m["name"],
                m["digest"][:12],
                human_bytes(size),
                proc,
                str(m.get("context_length", "")),
                until,
            ]
        )
    out(table(rows))


async def cmd_show(c: Client, args: argparse.Namespace) -> None:
    info = await c.request("POST", "/api/show", {"model": args.model, "verbose": args.verbose})
    for flag in ("license", "modelfile", "parameters", "system", "template"):
        if getattr(args, flag):
            out(info.get(flag) or "")
            return
    print_show(info)


async def cmd_pull(c: Client, args: argparse.Namespace, verb: str = "pull") -> None:
    with Progress("pushing" if verb == "push" else "pulling") as progress:
        async for p in c.stream(f"/api/{verb}", {"model": args.model, "insecure": args.insecure}):
            progress.update(p)


async def cmd_push(c: Client, args: argparse.Namespace) -> None:
    await cmd_pull(c, args, verb="push")


async def cmd_rm(c: Client, args: argparse.Namespace) -> None:
    for name in args.models:
        try:
            await c.request("POST", "/api/generate", {"model": name, "keep_alive": 0})
        except CliError:
            pass
        await c.request("DELETE", "/api/delete", {"model": name})
        out(f"deleted '{name}'")


async def cmd_cp(c: Client, args: argparse.Namespace) -> None:
    await c.request("POST", "/api/copy", {"source": args.source, "destination": args.destination})
    out(f"copied '{args.source}' to '{args.destination}'")


async def cmd_stop(c: Client, args: argparse.Namespace) -> None:
    try:
        await c.request("POST", "/api/show", {"model": args.model})
    except CliError as exc:
        raise CliError(f'couldn\'t find model "{args.model}" to stop') from exc
    await c.request("POST", "/api/generate", {"model": args.model, "keep_alive": 0})


async def cmd_create(c: Client, args: argparse.Namespace) -> None:
    path = Path(args.file) if args.file else Path("Modelfile")
    if not path.exists():
        raise CliError(f"no Modelfile found at {path}")
    try:
        req = parse(path.read_text(encoding="utf-8-sig")).create_request()
    except ModelfileError as exc:
        raise CliError(str(exc)) from exc
    base = path.resolve().parent
    src = req.pop("from", None)
    for value in [src] if isinstance(src, str) else src or []:  # several FROM: model + projector
        candidate = Path(os.path.expanduser(value))
        candidate = candidate if candidate.is_absolute() else base / candidate
        if candidate.is_file():
            req.setdefault("files", {})[candidate.name] = await c.upload_blob(candidate)
        else:
            req["from"] = value
    req["model"] = args.model
    async for p in c.stream("/api/create", req):
        sys.stderr.write(p.get("status", "") + "\n")


async def cmd_run(c: Client, args: argparse.Namespace) -> None:
    try:
        info = await c.request("POST", "/api/show", {"model": args.model})
    except CliError as exc:
        if "not found" not in str(exc):
            raise
        await cmd_pull(c, argparse.Namespace(model=args.model, insecure=args.insecure))
        info = await c.request("POST", "/api/show", {"model": args.model})
    vision = "vision" in ((info or {}).get("capabilities") or [])

    think = think_value(args.think)
    opts: dict[str, Any] = {"model": args.model}
    if args.keepalive:
        opts["keep_alive"] = args.keepalive
    if args.format:
        opts["format"] = args.format
    if think is not None:
        opts["think"] = think
    prompt = " ".join(args.prompt)
    if not prompt and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt:
        final = {}
        images: list[str] = []
        if vision:
            prompt, images = extract_images(prompt)
            if images:
                opts["images"] = images
        printer = ReplyPrinter(args.hidethinking)
        async for p in c.stream("/api/generate", {**opts, "prompt": prompt}):
            printer.add(p.get("thinking"), p.get("response"))
            final = p
        if printer.thinking:
            write("\n...done thinking.\n")
        out()
        if args.verbose:
            print_metrics(final)
        return
    session = Session(
        c,
        args.model,
        keepalive=args.keepalive,
        fmt=args.format,
        think=think,
        hide_thinking=args.hidethinking,
        verbose=args.verbose,
        vision=vision,
    )
    await session.preload()
    await repl(session)


def cmd_key_create(config: Config, args: argparse.Namespace) -> int:
    """``corral key create NAME``: a new key's hash goes into the key file, the key to stdout."""
    path = args.file or config.api_keys_file
    if path is None:
        sys.stderr.write("Error: no key file: set CORRAL_API_KEYS_FILE or pass --file\n")
        return 1
    secret = new_secret()
    entry = ApiKey(
        name=args.name,
        sha256=hash_secret(secret),
        scope=args.scope,
        models=tuple(args.model),
        requests_per_minute=args.requests_per_minute,
        tokens_per_minute=args.tokens_per_minute,
    )
    try:
        add_key(Path(path), entry)
    except (KeyFileError, OSError) as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    out(secret)
    sys.stderr.write(
        f"added key {args.name!r} ({args.scope}) to {path}; it is shown only this once. "
        "A running `corral serve` loads it on SIGHUP.\n"
    )
    return 0


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="corral", description="Ollama-compatible model server")
    p.add_argument("-v", "--version", action="store_true", help="show version information")
    sub = p.add_subparsers(dest="verb")
    sub.add_parser("serve", aliases=["start"], help="start the daemon")
    r = sub.add_parser("run", help="run a model")
    r.add_argument("model")
    r.add_argument("prompt", nargs="*")
    r.add_argument("--keepalive")
    r.add_argument("--verbose", action="store_true")
    r.add_argument("--insecure", action="store_true")
    r.add_argument("--format")
    r.add_argument(
        "--think",
        nargs="?",
        const="true",
        help="think before answering: true/false or high, medium, low",
    )
    r.add_argument(
        "--hidethinking",
        action="store_true",
        help="think (with --think or the model's default) but do not print it",
    )
    sub.add_parser("stop", help="stop a running model").add_argument("model")
    for verb in ("pull", "push"):
        x = sub.add_parser(verb, help=f"{verb} a model")
        x.add_argument("model")
        x.add_argument("--insecure", action="store_true")
    ls = sub.add_parser("list", aliases=["ls"], help="list models")
    ls.add_argument("prefix", nargs="?")
    sub.add_parser("ps", help="list running models")
    s = sub.add_parser("show", help="show information for a model")
    s.add_argument("model")
    for flag in ("license", "modelfile", "parameters", "system", "template"):
        s.add_argument(f"--{flag}", action="store_true")
    s.add_argument("-v", "--verbose", action="store_true")
    rm = sub.add_parser("rm", help="remove a model")
    rm.add_argument("models", nargs="+")
    cp = sub.add_parser("cp", help="copy a model")
    cp.add_argument("source")
    cp.add_argument("destination")
    cr = sub.add_parser("create", help="create a model from a Modelfile")
    cr.add_argument("model")
    cr.add_argument("-f", "--file")
    key = sub.add_parser("key", help="manage API keys (the file CORRAL_API_KEYS_FILE names)")
    kc = key.add_subparsers(dest="key_verb", required=True).add_parser(
        "create", help="make a key, add its hash to the key file, print the key (only once)"
    )
    kc.add_argument("name", help="the key's name (in logs and metrics)")
    kc.add_argument("--scope", choices=SCOPES, default="inference")
    kc.add_argument(
        "--model", action="append", default=[], help="a model name or glob it may use (repeat)"
    )
    kc.add_argument("--requests-per-minute", type=int, default=0, metavar="N")
    kc.add_argument("--tokens-per-minute", type=int, default=0, metavar="N")
    kc.add_argument("--file", type=Path, help="the key file (default: CORRAL_API_KEYS_FILE)")
    dr = sub.add_parser("doctor", help="show what this machine is to corral, and what is wrong")
    dr.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    return p


VERBS = {
    "list": cmd_list,
    "ls": cmd_list,
    "ps": cmd_ps,
    "show": cmd_show,
    "pull": cmd_pull,
    "push": cmd_push,
    "rm": cmd_rm,
    "cp": cmd_cp,
    "stop": cmd_stop,
    "create": cmd_create,
    "run": cmd_run,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config.from_env()
    if args.version:
        out(f"corral version is {VERSION}")
        return 0
    if args.verb in ("serve", "start"):  # `corral serve` comes by cli.entry, not here
        return boot.serve(config)
    if args.verb is None:
        build_parser().print_help()
        return 0
    if args.verb == "key":
        return cmd_key_create(config, args)
    if args.verb == "doctor":
        configure(logging.WARNING)  # the report on stdout, problems while probing: stderr
        out(doctor.main(config, args.json))
        return 0

    async def go() -> None:
        async with Client(config.client_url, config.api_key) as c:
            await VERBS[args.verb](c, args)

    try:
        asyncio.run(go())
    except CliError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: its classes (CliError) are the ones the
    # modules it calls (interactive) catch.
    from corral.daemon.cli.main import main as _main

    sys.exit(_main())
