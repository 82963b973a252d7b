"""Open WebUI against corral, in a real browser: does its default chat answer, and how long from
sending the first message of a new chat to the first token on screen.

Needs what the project does not install: Open WebUI and Playwright in a venv of their own
(``python3 -m venv V && V/bin/pip install open-webui playwright``, several GB) and Debian's
``chromium`` (Playwright drives it; no browser is downloaded). Run it with that venv's Python::

    V/bin/python bench/openwebui.py [--runs 3] [--keep-alive 5m]

It starts ``corral serve`` from this checkout (``.venv``) on a free port with a fresh store (the
embedded gemma3:270m is imported and preloaded, as ``./dev serve`` does on a new machine), then
Open WebUI on another free port with offline settings (no login, no update check, no telemetry,
no model downloads, no OpenAI connection), and per run opens a new chat in headless Chromium,
types the question, presses Enter and waits for the assistant's first text, then for the whole
answer. It prints one line per run and the median; the machine's load (``os.getloadavg``) is
printed with them since this machine may be shared. Everything it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "Hi! What is the capital of France?"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
OFFLINE = {
    "WEBUI_AUTH": "False",
    "OFFLINE_MODE": "True",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "ENABLE_OPENAI_API": "False",
    "BYPASS_EMBEDDING_AND_RETRIEVAL": "True",
    "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
    "ANONYMIZED_TELEMETRY": "False",
    "DO_NOT_TRACK": "True",
    "SCARF_NO_ANALYTICS": "True",
    "ENABLE_VERSION_UPDATE_CHECK": "False",
    "WEBUI_SECRET_KEY": "corral-bench",
}
LAST_TEXT = (
    "() => { const m = document.querySelectorAll('#response-content-container');"
    " return m.length ? m[m.length - 1].innerText.trim() : ''; }"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s")


def in_flight(corral: str) -> int:
    with urllib.request.urlopen(corral + "/api/ps", timeout=10) as r:
        return sum(m.get("in_flight", 0) for m in json.loads(r.read())["models"])


def one_chat(browser, owui: str, corral: str, shots: Path, i: int) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(180_000)
    page.goto(owui + "/", wait_until="domcontentloaded")
    box = page.locator("#chat-input")
    box.wait_for(state="visible")
    page.wait_for_timeout(2000)
    ok = page.get_by_text("Okay, Let's Go!")  # a new user's release notes
    if ok.count():
        ok.first.click()
        page.wait_for_timeout(500)
    box.click()
    page.keyboard.type(QUESTION)
    sent = time.monotonic()
    page.keyboard.press("Enter")
    page.wait_for_function(LAST_TEXT, polling=20)
    first = time.monotonic() - sent
    last, deadline = None, time.monotonic() + 180
    while time.monotonic() < deadline:  # the answer: text unchanged and corral idle
        text = page.evaluate(LAST_TEXT)
        if text == last and not in_flight(corral):
            break
        last = text
        page.wait_for_timeout(1000)
    page.screenshot(path=str(shots / f"chat-{i}.png"), full_page=True)
    page.close()
    return {
        "first_token_s": round(first, 3),
        "answer_s": round(time.monotonic() - sent, 2),
        "answer": last,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep-alive", default="30m")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright  # the Open WebUI venv's

    work = Path(tempfile.mkdtemp(prefix="corral-owui-"))
    corral_port, owui_port = free_port(), free_port()
    corral, owui = f"http://127.0.0.1:{corral_port}", f"http://127.0.0.1:{owui_port}"
    procs = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "CORRAL_"))}
        env.update(
            OLLAMA_HOST=f"127.0.0.1:{corral_port}",
            OLLAMA_MODELS=str(work / "models"),
            OLLAMA_KEEP_ALIVE=args.keep_alive,
        )
        log = (work / "corral.log").open("w")
        procs.append(
            subprocess.Popen([str(REPO / ".venv/bin/corral"), "serve"], env=env, stderr=log)
        )
        wait_http(corral + "/readyz", 600)
        owui_env = {
            **os.environ,
            **OFFLINE,
            "DATA_DIR": str(work / "owui"),
            "OLLAMA_BASE_URL": corral,
        }
        (work / "owui").mkdir()
        owui_bin = str(Path(sys.executable).parent / "open-webui")
        olog = (work / "owui.log").open("w")
        procs.append(
            subprocess.Popen(
                [owui_bin, "serve", "--host", "127.0.0.1", "--port", str(owui_port)],
                env=owui_env,
                cwd=work / "owui",
                stdout=olog,
                stderr=olog,
            )
        )
        wait_http(owui + "/", 900)
        runs = []
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
            for i in range(args.runs):
                r = one_chat(browser, owui, corral, work, i)
                r["load_1m"] = round(os.getloadavg()[0], 1)
                runs.append(r)
                print(json.dumps(r), flush=True)
            browser.close()
        firsts = [r["first_token_s"] for r in runs]
        print(
            f"first token: median {statistics.median(firsts):.2f} s over {len(firsts)} new chats"
            f" (min {min(firsts):.2f}, max {max(firsts):.2f}); screenshots and logs in {work}"
        )
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
