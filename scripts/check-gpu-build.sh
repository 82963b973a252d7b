#!/usr/bin/env bash
# Proves a GPU build of llama.cpp builds, and behaves, on this machine:
#
#   scripts/check-gpu-build.sh cuda|vulkan|hip|metal|cpu
#
# 1. builds llama-cpp-python for BACKEND with scripts/install-llama.sh (the same plan, patch and
#    wheel cache as ./dev; CORRAL_CUDA_ARCHITECTURES narrows a CUDA build, CORRAL_VULKAN_INCLUDE
#    chooses the Vulkan headers) into its own venv, ~/.cache/corral/check/BACKEND
#    (CORRAL_CHECK_DIR), and installs corral there; an interrupted build resumes;
# 2. prints the engine probe's JSON line and checks that the BACKEND backend is compiled in;
# 3. prints what `corral doctor` says of the build and the GPUs, and its problems;
# 4. starts `corral serve` on a free port with a fresh store (the embedded gemma3:270m), sends
#    one chat and checks it answers; on a machine without a device of BACKEND, also checks the
#    daemon said in one line that models run on the CPU, and why.
# Each result is printed under a "== ... ==" heading, for a report. Exits non-zero on a failure.
# Not part of ./dev test: a GPU build takes long on small machines (CUDA: see daemon/buildplan.py).
set -euo pipefail
BACKEND="${1:?usage: scripts/check-gpu-build.sh cuda|vulkan|hip|metal|cpu}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CORRAL_CHECK_DIR:-$HOME/.cache/corral/check}/$BACKEND"
PY="$DIR/venv/bin/python"
say() { printf 'check-gpu-build: %s\n' "$*" >&2; }
section() { printf '\n== %s ==\n' "$*"; }
# the build the operator asked for: install-llama.sh builds it, doctor compares against it
export CORRAL_LLAMA_BACKEND="$BACKEND"

mkdir -p "$DIR"
[ -x "$PY" ] || python3 -m venv "$DIR/venv"
"$PY" -m pip install -q --upgrade pip
start=$(date +%s)
PYTHON="$PY" bash "$HERE/scripts/install-llama.sh"
section "build"
echo "llama-cpp-python for $BACKEND installed in $(($(date +%s) - start)) s (0-60 s: the cached wheel)"
"$PY" -c 'import json, sys; print(json.load(open(sys.prefix + "/corral-llama-build.json"))["cmake_args"])'
"$PY" -m pip install -q -e "$HERE"

# 2. the engine probe
section "engine probe (JSON line)"
probe=$(cd "$DIR" && "$PY" -m corral.runner --probe 2>"$DIR/probe.stderr")
printf '%s\n' "$probe"
"$PY" - "$BACKEND" "$probe" <<'EOF'
import json, sys
backend, probe = sys.argv[1], json.loads(sys.argv[2])
names = {"cuda": "CUDA", "vulkan": "Vulkan", "hip": "ROCm", "metal": "Metal", "cpu": "CPU"}
want = names[backend]
if probe.get("error"):
    sys.exit(f"check-gpu-build: the engine did not load: {probe['error']}")
if want.lower() not in [b.lower() for b in probe.get("backends", [])]:
    # ggml-vulkan does not register at all where the loader finds no driver: its library is there
    import pathlib, llama_cpp
    libs = sorted((pathlib.Path(llama_cpp.__file__).parent / "lib").glob(f"libggml-{backend}.*"))
    if backend == "cpu" or not libs or probe["build"].get("backend") != backend:
        sys.exit(f"check-gpu-build: no {want} backend compiled in (backends: {probe.get('backends')})")
    print(f"{want} backend compiled in ({libs[0].name}) but not registered: no {want} driver here")
    sys.exit(0)
devices = [d["name"] for d in probe["devices"] if d["backend"].lower() == want.lower()]
print(f"{want} backend compiled in; its devices: {devices or 'none'}")
EOF

# 3. what doctor says (its build, gpus and problems sections)
section "corral doctor (build, gpus, problems)"
store=$(mktemp -d)
OLLAMA_MODELS="$store" "$PY" -m corral.daemon.cli doctor |
  awk '/^[^ ]/ { on = ($1 == "build" || $1 == "gpus" || $1 == "problems") } on'

# 4. a daemon on a fresh store answers a chat
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log="$DIR/serve.log"
OLLAMA_MODELS="$store" OLLAMA_HOST="127.0.0.1:$port" "$PY" -m corral.daemon.cli serve >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$store"' EXIT
for _ in $(seq 1 120); do
  grep -q "corral is ready" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log" >&2; say "corral serve exited"; exit 1; }
  sleep 1
done
section "daemon: what it said of the GPUs and where it placed the model"
grep -i 'gpu' "$log" | grep -v 'event="server config"' || echo "(none)"
section "chat (gemma3:270m through /api/chat)"
"$PY" - "$port" <<'EOF'
import json, sys, urllib.request
body = json.dumps({"model": "gemma3:270m", "stream": False, "options": {"num_predict": 8},
                   "messages": [{"role": "user", "content": "The capital of France is"}]})
req = urllib.request.Request(f"http://127.0.0.1:{sys.argv[1]}/api/chat", body.encode(),
                             {"Content-Type": "application/json"})
out = json.load(urllib.request.urlopen(req, timeout=300))
assert out["done"] is True, out
print(json.dumps({"content": out["message"]["content"], "done_reason": out["done_reason"],
                  "eval_count": out.get("eval_count")}))
EOF
section "/api/ps"
"$PY" -c "import json,urllib.request;print(json.dumps([{k: m.get(k) for k in ('name', 'size', 'size_vram', 'gpus')} for m in json.load(urllib.request.urlopen('http://127.0.0.1:$port/api/ps'))['models']]))"
section "verdict"
"$PY" - "$BACKEND" "$probe" "$log" <<'EOF'
import json, sys
backend, probe, log = sys.argv[1], json.loads(sys.argv[2]), open(sys.argv[3]).read()
if backend != "cpu" and not [d for d in probe["devices"] if d["type"] in ("gpu", "igpu")]:
    lines = [line for line in log.splitlines() if "gpus unused" in line]
    if len(lines) != 1 or "found no device" not in lines[0]:
        sys.exit("check-gpu-build: no device, but the daemon did not say why in one line")
    print("no device: the daemon said why in one line, and the chat answered on the CPU")
print(f"check-gpu-build {backend}: ok")
EOF
