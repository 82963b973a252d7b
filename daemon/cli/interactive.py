"""Interactive ``corral run MODEL`` (Ollama's REPL) and the per-layer progress of ``pull``/``push``.

The REPL reads lines with prompt-toolkit (history in ``~/.corral/history``, line editing) and
keeps a session: parameters, system message, format, think mode and the conversation. Each
turn is one streamed ``/api/chat``. Commands (Ollama's texts):

* ``/set parameter NAME VALUE…`` (typed as a Modelfile PARAMETER; ``stop`` takes several),
  ``/set system TEXT``, ``/set format json`` / ``noformat``, ``/set think [LEVEL]`` / ``nothink``,
  ``/set verbose`` / ``quiet``, ``/set history`` / ``nohistory``, ``/set wordwrap`` /
  ``nowordwrap``;
* ``/show info|license|modelfile|parameters|system|template``;
* ``/load MODEL`` (new conversation), ``/save NAME`` (``/api/create`` from the current model with
  the session's parameters, system message and messages), ``/clear``, ``/bye`` / ``/exit``,
  ``/?`` / ``/help``.

For a model with the ``vision`` capability, paths of PNG, JPEG or WebP files in a message
(``./cat.png``, ``/tmp/a b.jpg`` written ``/tmp/a\\ b.jpg``, ``~/x.webp``) are read, sent as the
message's images and removed from its text (``Added image '…'``).

A line with an unclosed ``\"\"\"`` continues (prompt ``... ``) until a line closes it; the quotes
are dropped, so ``/set system \"\"\"…\"\"\"`` takes several lines too. Ctrl+C stops a reply
(the turn is dropped) or, at the prompt, prints how to leave; Ctrl+D leaves.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any, Protocol

from prompt_toolkit import PromptSession
from prompt_toolkit.formatted_text import AnyFormattedText
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.output import create_output
from prompt_toolkit.shortcuts import ProgressBar
from prompt_toolkit.shortcuts.progress_bar.formatters import Formatter

from corral.daemon.cli.output import CliError, human_bytes, print_metrics, print_show, write
from corral.daemon.errors import InvalidRequest
from corral.daemon.params import type_param

PROMPT = ">>> "
CONTINUE = "... "
PLACEHOLDER = "Send a message (/? for help)"
QUOTES = '"""'

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <model>   Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message.
"""

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set history           Enable history
  /set nohistory         Disable history
  /set wordwrap          Enable wordwrap
  /set nowordwrap        Disable wordwrap
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
  /set think             Enable thinking
  /set nothink           Disable thinking
"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show license      Show model license
  /show modelfile    Show Modelfile for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show prompt template
"""

HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + a            Move to the beginning of the line (Home)
  Ctrl + e            Move to the end of the line (End)
  Ctrl + k            Delete the sentence after the cursor
  Ctrl + u            Delete the sentence before the cursor
  Ctrl + w            Delete the word before the cursor
  Ctrl + l            Clear the screen
  Ctrl + c            Stop the model from responding
  Ctrl + d            Exit (/bye)
"""


# A path starting with ./ ../ ~/ or / and ending in an image extension; "\ " escapes a space.
IMAGE_PATH = re.compile(r"(?:\.{1,2}/|~/|/)(?:[^\s\\]|\\ )+?\.(?:jpe?g|png|webp)(?!\w)", re.I)
IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")  # PNG, JPEG; WebP checked below
MAX_IMAGE = 100 * 1000 * 1000


def _is_image(data: bytes) -> bool:
    return data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def extract_images(text: str) -> tuple[str, list[str]]:
    """The image files named in ``text``: (text without their paths, base64 images). A path
    that is not a readable PNG/JPEG/WebP file (at most 100 MB) stays in the text."""
    images: list[str] = []
    for raw in IMAGE_PATH.findall(text):
        path = Path(os.path.expanduser(raw.replace("\\ ", " ")))
        try:
            if path.stat().st_size > MAX_IMAGE:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if not _is_image(data):
            continue
        images.append(base64.b64encode(data).decode())
        text = text.replace(raw, "", 1)
        write(f"Added image '{path}'\n")
    return (" ".join(text.split()) if images else text), images


class ClientLike(Protocol):
    async def request(self, method: str, path: str, body: Any = None) -> Any: ...
    def stream(self, path: str, body: Any) -> Any: ...


def think_value(text: str | None) -> bool | str | None:
    """``--think`` / ``/set think`` values: true/false or a level (high, medium, low)."""
    if text is None:
        return None
    t = text.strip().lower()
    if t in ("", "true", "1", "yes", "on"):
        return True
    if t in ("false", "0", "no", "off"):
        return False
    return t


class ReplyPrinter:
    """Writes a streamed reply as Ollama's CLI does: thinking (unless hidden) after
    ``Thinking...``, closed by ``...done thinking.`` when the answer starts. ``thinking`` is
    True while a thinking block is open; the caller closes one left open at the end."""

    def __init__(self, hide_thinking: bool) -> None:
        self.hide_thinking = hide_thinking
        self.thinking = False

    def add(self, thinking: str | None, content: str | None) -> None:
        if thinking and not self.hide_thinking:
            if not self.thinking:
                write("Thinking...\n")
                self.thinking = True
            write(thinking)
        if content:
            if self.thinking:
                write("\n...done thinking.\n\n")
                self.thinking = False
            write(content)


class Session:
    """One interactive conversation with a model."""

    def __init__(
        self,
        client: ClientLike,
        model: str,
        *,
        keepalive: str | None = None,
        fmt: str | None = None,
        think: bool | str | None = None,
        hide_thinking: bool = False,
        verbose: bool = False,
        vision: bool = False,
    ) -> None:
        self.client = client
        self.model = model
        self.keepalive = keepalive
        self.format = fmt
        self.think = think
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self.vision = vision  # the model reads images: paths become images
        self.options: dict[str, Any] = {}
        self.system: str | None = None
        self.messages: list[dict[str, Any]] = []
        self.history = True

    # -- requests ------------------------------------------------------------------------------

    def _common(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model}
        if self.keepalive:
            body["keep_alive"] = self.keepalive
        if self.think is not None:
            body["think"] = self.think
        return body

    async def preload(self) -> None:
        await self.client.request("POST", "/api/generate", self._common())

    async def chat(self, text: str) -> None:
        """One turn: stream the reply; on success both messages join the conversation."""
        user: dict[str, Any] = {"role": "user", "content": text}
        if self.vision:
            user["content"], images = extract_images(text)
            if images:
                user["images"] = images
        sent = (
            ([{"role": "system", "content": self.system}] if self.system else [])
            + self.messages
            + [user]
        )
        body = {**self._common(), "messages": sent, "stream": True}
        if self.options:
            body["options"] = self.options
        if self.format:
            body["format"] = self.format
        reply, thought, final = "", "", {}
        printer = ReplyPrinter(self.hide_thinking)
        async for p in self.client.stream("/api/chat", body):
            msg = p.get("message") or {}
            thought += msg.get("thinking") or ""
            reply += msg.get("content") or ""
            printer.add(msg.get("thinking"), msg.get("content"))
            final = p
        if printer.thinking:
            write("\n...done thinking.\n\n")
        write("\n\n")
        assistant: dict[str, Any] = {"role": "assistant", "content": reply}
        if thought:
            assistant["thinking"] = thought
        self.messages += [user, assistant]
        if self.verbose:
            print_metrics(final)

    # -- commands ------------------------------------------------------------------------------

    async def command(self, line: str) -> bool:
        """Run a ``/`` command; False means leave."""
        words = line.split(None, 2)
        cmd = words[0].lower()
        if cmd in ("/bye", "/exit"):
            return False
        if cmd in ("/?", "/help"):
            topic = words[1].lower() if len(words) > 1 else ""
            write(
                {
                    "set": HELP_SET,
                    "/set": HELP_SET,
                    "show": HELP_SHOW,
                    "/show": HELP_SHOW,
                    "shortcut": HELP_SHORTCUTS,
                    "shortcuts": HELP_SHORTCUTS,
                }.get(topic, HELP)
            )
        elif cmd == "/clear":
            self.messages = []
            write("Cleared session context\n")
        elif cmd == "/set":
            self._set(words[1:])
        elif cmd == "/show":
            await self._show(words[1].lower() if len(words) > 1 else "")
        elif cmd == "/load":
            await self._load(words[1] if len(words) > 1 else "")
        elif cmd == "/save":
            await self._save(words[1] if len(words) > 1 else "")
        else:
            write(f"Unknown command '{words[0]}'. Type /? for help\n")
        return True

    def _set(self, args: list[str]) -> None:
        if not args:
            write(HELP_SET)
            return
        what = args[0].lower()
        rest = args[1] if len(args) > 1 else ""
        if what == "parameter":
            name, _, value = rest.partition(" ")
            value = value.strip()
            if not name or not value:
                write("Usage:\n  /set parameter <name> <value>\n")
                return
            raw: Any = value.split() if name == "stop" else value
            try:
                self.options[name] = type_param(name, raw)
            except InvalidRequest as e:
                write(f"Couldn't set parameter: {e.message}\n")
                return
            shown = ", ".join(raw) if name == "stop" else value
            write(f"Set parameter '{name}' to '{shown}'\n")
        elif what == "system":
            if not rest.strip():
                write("Usage:\n  /set system <string>\n")
                return
            self.system = rest.strip()
            write("Set system message.\n")
        elif what == "format":
            if rest.strip().lower() != "json":
                write("Invalid or missing format. For 'json' mode use '/set format json'\n")
                return
            self.format = "json"
            write("Set format to 'json' mode.\n")
        elif what == "noformat":
            self.format = None
            write("Disabled format.\n")
        elif what == "think":
            self.think = think_value(rest) if rest.strip() else True
            write(
                "Set 'think' mode.\n"
                if self.think is True
                else f"Set 'think' mode to '{self.think}'.\n"
            )
        elif what == "nothink":
            self.think = False
            write("Set 'nothink' mode.\n")
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            write(f"Set '{what}' mode.\n")
        elif what in ("history", "nohistory"):
            self.history = what == "history"
            write(f"Set '{what}' mode.\n")
        elif what in ("wordwrap", "nowordwrap"):
            write(f"Set '{what}' mode.\n")
        else:
            write(f"Unknown command '/set {what}'. Type /? for help\n")

    async def _show(self, what: str) -> None:
        try:
            info = await self.client.request("POST", "/api/show", {"model": self.model})
        except CliError as e:
            write(f"error: couldn't get model: {e}\n")
            return
        if what == "info":
            print_show(info)
        elif what == "license":
            write((info.get("license") or "No license was specified for this model.") + "\n")
        elif what == "modelfile":
            write((info.get("modelfile") or "") + "\n")
        elif what == "parameters":
            if not info.get("parameters") and not self.options:
                write("No parameters were specified for this model.\n")
                return
            if info.get("parameters"):
                write("Model defined parameters:\n" + info["parameters"].rstrip("\n") + "\n\n")
            if self.options:
                write("User defined parameters:\n")
                for k, v in self.options.items():
                    shown = " ".join(v) if isinstance(v, list) else v
                    write(f"{k:<30} {shown}\n")
        elif what == "system":
            text = self.system or info.get("system")
            write((text or "No system message was specified for this model.") + "\n")
        elif what == "template":
            write(
                (info.get("template") or "No prompt template was specified for this model.") + "\n"
            )
        else:
            write(HELP_SHOW)

    async def _load(self, model: str) -> None:
        if not model:
            write("Usage:\n  /load <modelname>\n")
            return
        write(f"Loading model '{model}'\n")
        previous = self.model
        self.model = model
        try:
            info = await self.client.request("POST", "/api/show", {"model": model})
            await self.preload()
        except CliError as e:
            self.model = previous
            write(f"error: {e}\n")
            return
        self.messages = []
        self.system = None
        self.vision = "vision" in ((info or {}).get("capabilities") or [])

    async def _save(self, name: str) -> None:
        if not name:
            write("Usage:\n  /save <modelname>\n")
            return
        body: dict[str, Any] = {"model": name, "from": self.model, "stream": False}
        if self.options:
            body["parameters"] = self.options
        if self.system:
            body["system"] = self.system
        if self.messages:
            body["messages"] = [{"role": m["role"], "content": m["content"]} for m in self.messages]
        try:
            await self.client.request("POST", "/api/create", body)
        except CliError as e:
            write(f"error: {e}\n")
            return
        write(f"Created new model '{name}'\n")


async def read_message(ask) -> str:
    """One input: a line, or several when a ``\"\"\"`` is left open (the quotes are dropped)."""
    text = await ask(PROMPT)
    if QUOTES not in text:
        return text
    while text.count(QUOTES) % 2 == 1:
        text += "\n" + await ask(CONTINUE)
    return text.replace(QUOTES, "").strip()


def history_file() -> Path:
    path = Path.home() / ".corral" / "history"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


async def repl(session: Session, prompt: PromptSession | None = None) -> None:
    """Read and run inputs until /bye or Ctrl+D."""
    if prompt is None:
        try:
            history: Any = FileHistory(str(history_file()))
        except OSError:
            history = InMemoryHistory()
        prompt = PromptSession(history=history)

    async def ask(text: str) -> str:
        return await prompt.prompt_async(text, placeholder=PLACEHOLDER if text == PROMPT else "")

    loop = asyncio.get_running_loop()
    while True:
        try:
            line = await read_message(ask)
        except KeyboardInterrupt:
            write("Use Ctrl + d or /bye to exit.\n")
            continue
        except EOFError:
            write("\n")
            return
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith("/") and not line.startswith(" "):
            if not await session.command(stripped):
                return
            continue
        turn = asyncio.ensure_future(session.chat(line))
        loop.add_signal_handler(signal.SIGINT, turn.cancel)  # Ctrl+C stops the reply
        try:
            await turn
        except asyncio.CancelledError:
            if not turn.cancelled():
                raise
            write("\n\n")
        finally:
            loop.remove_signal_handler(signal.SIGINT)


# ---- pull / push progress ------------------------------------------------------------------------


def _bar(fraction: float, width: int) -> str:
    full = int(round(fraction * width))
    return "█" * full + " " * (width - full)


def layer_line(label: str, completed: int, total: int, width: int = 40) -> str:
    """``pulling 8934d96d3f08:  45% ▕█████████         ▏ 900 MB/2.0 GB`` (total alone at 100%)."""
    frac = min(1.0, completed / total) if total else 1.0
    size = (
        human_bytes(total)
        if completed >= total
        else f"{human_bytes(completed)}/{human_bytes(total)}"
    )
    return f"{label}: {int(frac * 100):3d}% ▕{_bar(frac, width)}▏ {size}"


class _Line(Formatter):
    """The whole line of a counter: a status label alone, or a layer's bar."""

    def format(self, progress_bar: Any, progress: Any, width: int) -> AnyFormattedText:
        if not progress.total:
            return str(progress.label)
        bar = max(10, min(40, width - 60))
        return layer_line(str(progress.label), progress.items_completed, progress.total, bar)


class Progress:
    """Pull/push progress as Ollama's CLI shows it: one bar per layer (by digest), other
    statuses as lines. On a terminal the bars redraw in place (prompt-toolkit's ProgressBar on
    stderr); otherwise each status and each finished layer is printed once."""

    def __init__(self, verb: str, tty: bool | None = None) -> None:
        self.verb = verb
        # The bars need a terminal on both ends (prompt-toolkit's application reads keys).
        self.tty = sys.stderr.isatty() and sys.stdin.isatty() if tty is None else tty
        self._bars: dict[str, Any] = {}
        self._status: Any = None
        self._seen: set[str] = set()
        self._pb: ProgressBar | None = None

    def __enter__(self) -> Progress:
        if self.tty:
            self._pb = ProgressBar(formatters=[_Line()], output=create_output(stdout=sys.stderr))
            self._pb.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pb is not None:
            for c in self._bars.values():
                c.done = True
            self._pb.__exit__(*exc)

    def update(self, p: dict[str, Any]) -> None:
        status = p.get("status", "")
        digest = p.get("digest")
        if digest and p.get("total"):
            self._layer(digest, int(p["total"]), int(p.get("completed") or 0))
        elif status:
            self._line(status)

    def _layer(self, digest: str, total: int, completed: int) -> None:
        label = f"{self.verb} {digest.removeprefix('sha256:')[:12]}"
        if self._pb is not None:
            bar = self._bars.get(digest)
            if bar is None:
                bar = self._bars[digest] = self._pb(label=label, total=total)
            bar.items_completed = completed
            if completed >= total:
                bar.done = True
            self._pb.invalidate()
        elif completed >= total and digest not in self._seen:
            self._seen.add(digest)
            sys.stderr.write(layer_line(label, completed, total) + "\n")
            sys.stderr.flush()

    def _line(self, status: str) -> None:
        if status in self._seen:
            return
        self._seen.add(status)
        if self._pb is not None:
            if self._status is not None:
                self._status.done = True
            self._status = self._pb(label=status)
            self._pb.invalidate()
        else:
            sys.stderr.write(status + "\n")
            sys.stderr.flush()


__all__ = [
    "Progress",
    "ReplyPrinter",
    "Session",
    "extract_images",
    "layer_line",
    "read_message",
    "repl",
    "think_value",
]
