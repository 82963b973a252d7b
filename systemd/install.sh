#!/usr/bin/env bash
# Install corral as a systemd service on Linux.
#
#   sudo systemd/install.sh [--prefix DIR] [--root DIR] [--no-start]
#
# 1. creates the system user and group `corral` (home /var/lib/corral, no login shell);
# 2. creates the model store /var/lib/corral/models owned by it;
# 3. installs systemd/corral.service as /etc/systemd/system/corral.service, its ExecStart
#    pointing at DIR/.venv/bin/corral (DIR = --prefix, default this checkout; run `./dev install`
#    there first, in a directory the corral user can read, e.g. /opt/corral);
# 4. enables the unit and starts it (daemon-reload, enable --now), unless --no-start;
# 5. prints how to change OLLAMA_* settings (`systemctl edit corral`).
#
# --root DIR installs into DIR instead of / (images, packaging, tests): the user is added to
# DIR/etc/passwd (useradd --prefix), the unit is enabled with `systemctl --root` (symlinks only)
# and nothing is started; the running system is not touched.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
prefix="$(dirname "$here")"
root=""
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --root) root="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
prefix="$(cd "$prefix" && pwd)"
root="${root%/}"
exe="$prefix/.venv/bin/corral"
home=/var/lib/corral
unit="$root/etc/systemd/system/corral.service"

if [ ! -x "$exe" ]; then
  echo "install.sh: $exe not found: run ./dev install in $prefix first" >&2
  exit 1
fi
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh: run as root (sudo), or with --root DIR" >&2
  exit 1
fi

# 1. the service user (idempotent)
if [ -n "$root" ]; then
  if ! grep -q '^corral:' "$root/etc/passwd" 2>/dev/null; then
    useradd --prefix "$root" --system --user-group --home-dir "$home" \
      --shell /usr/sbin/nologin --comment "corral model server" corral
  fi
  ids="$(awk -F: '$1 == "corral" {print $3 ":" $4}' "$root/etc/passwd")"
else
  if ! getent passwd corral >/dev/null; then
    useradd --system --user-group --home-dir "$home" --shell /usr/sbin/nologin \
      --comment "corral model server" corral
  fi
  ids="corral:corral"
fi

# 2. home and store
install -d -m 0755 "$root$home"
install -d -m 0755 "$root$home/models"
chown "$ids" "$root$home" "$root$home/models"

# 3. the unit, pointing at this installation
install -d -m 0755 "$(dirname "$unit")"
# quoted for systemd (a path may hold spaces), escaped for sed
esc="$(printf '%s' "$exe" | sed -e 's/[\\&#]/\\&/g')"
# the unit's ProtectHome=yes hides /home, /root and /run/user: a checkout there stays readable
case "$prefix/" in
  /home/*|/root/*|/run/user/*) home_rule="s#^ProtectHome=yes\$#ProtectHome=read-only#" ;;
  *) home_rule="" ;;
esac
sed -e "s#^ExecStart=.*#ExecStart=\"$esc\" serve#" ${home_rule:+-e "$home_rule"} \
  "$here/corral.service" > "$unit.tmp"
chmod 0644 "$unit.tmp"
mv "$unit.tmp" "$unit"

# 4. enable (and start)
if [ -n "$root" ]; then
  systemctl --root="$root" enable corral.service
elif [ "$start" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --now corral.service
else
  systemctl daemon-reload
  systemctl enable corral.service
fi

# 5. how to tune it
cat <<MSG
corral installed: $unit (runs $exe serve as user corral, store $home/models).
Change OLLAMA_* settings (same variables as Ollama) with:
  sudo systemctl edit corral
    [Service]
    Environment="OLLAMA_HOST=0.0.0.0:11434"
    Environment="OLLAMA_NUM_PARALLEL=4"
then: sudo systemctl restart corral.   Logs: journalctl -u corral -f
MSG
