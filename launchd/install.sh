#!/usr/bin/env bash
# Install corral as a launchd agent on macOS (runs `corral serve` while you are logged in).
#
#   launchd/install.sh [--prefix DIR] [--home DIR] [--no-load]
#
# 1. writes ~/Library/LaunchAgents/com.corral.serve.plist from launchd/com.corral.serve.plist,
#    ProgramArguments = DIR/.venv/bin/corral serve (DIR = --prefix, default this checkout; run
#    `./dev install` there first), logs in ~/Library/Logs/corral.log;
# 2. loads it (launchctl bootout of an older copy, then bootstrap into gui/<uid>), unless
#    --no-load;
# 3. prints how to set OLLAMA_* variables with `launchctl setenv`.
#
# --home DIR writes under DIR instead of $HOME (tests, packaging).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
prefix="$(dirname "$here")"
home="${HOME:?HOME is not set}"
load=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --home) home="$2"; shift 2 ;;
    --no-load) load=0; shift ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
prefix="$(cd "$prefix" && pwd)"
exe="$prefix/.venv/bin/corral"
python="$prefix/.venv/bin/python"
label=com.corral.serve
agents="$home/Library/LaunchAgents"
plist="$agents/$label.plist"
logs="$home/Library/Logs"

if [ ! -x "$exe" ] || [ ! -x "$python" ]; then
  echo "install.sh: $exe not found: run ./dev install in $prefix first" >&2
  exit 1
fi

# 1. the agent, written with plistlib (a valid plist whatever the paths contain)
mkdir -p "$agents" "$logs"
"$python" - "$here/$label.plist" "$plist.tmp" "$exe" "$logs/corral.log" <<'PY'
import plistlib, sys
src, dst, exe, log = sys.argv[1:]
with open(src, "rb") as f:
    agent = plistlib.load(f)
agent["ProgramArguments"] = [exe, "serve"]
agent["StandardErrorPath"] = agent["StandardOutPath"] = log
with open(dst, "wb") as f:
    plistlib.dump(agent, f)
PY
mv "$plist.tmp" "$plist"

# 2. load it (replacing a loaded copy)
if [ "$load" = 1 ]; then
  domain="gui/$(id -u)"
  launchctl bootout "$domain/$label" 2>/dev/null || true
  launchctl bootstrap "$domain" "$plist"
  launchctl enable "$domain/$label"
fi

# 3. settings
cat <<MSG
corral agent installed: $plist (runs $exe serve; log $logs/corral.log).
Set OLLAMA_* variables (same as Ollama) for launchd-started programs, then restart the agent:
  launchctl setenv OLLAMA_HOST 0.0.0.0:11434
  launchctl setenv OLLAMA_MODELS "\$HOME/.ollama/models"
  launchctl setenv OLLAMA_KEEP_ALIVE 10m
  launchctl kickstart -k gui/\$(id -u)/$label
(launchctl setenv lasts until logout; the agent sets none itself, so these are not overridden.)
Uninstall: launchctl bootout gui/\$(id -u)/$label && rm "$plist"
MSG
