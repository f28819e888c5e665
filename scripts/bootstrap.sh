#!/usr/bin/env bash
# Installs what `make test` and `make demo` need when it is missing, and says what it does.
# Debian packages need root; without root it prints the exact apt-get line and stops.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }

missing_debs=()
command -v go >/dev/null 2>&1 || missing_debs+=(golang-go)
[ -d /usr/share/gocode/src/github.com/vmware/govmomi/simulator ] || missing_debs+=(golang-github-vmware-govmomi-dev)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing_debs+=(postgresql)
command -v etcd >/dev/null 2>&1 || missing_debs+=(etcd-server)
# Prefect's server in several replicas (the distributed lab) shares its messaging through Redis.
command -v redis-server >/dev/null 2>&1 || missing_debs+=(redis-server)
# The protect wizard is tested in a real terminal.
command -v tmux >/dev/null 2>&1 || missing_debs+=(tmux)
# The gateway's console is tested in a real browser: Debian's Chromium, driven by Playwright.
[ -x /usr/bin/chromium ] || missing_debs+=(chromium)
# The lab's sites are network namespaces; its faults are nftables drops.
command -v ip >/dev/null 2>&1 || missing_debs+=(iproute2)
command -v nft >/dev/null 2>&1 || missing_debs+=(nftables)
# Drills snapshot the lab's standbys on btrfs (`drflow lab up --pg-storage btrfs`).
command -v mkfs.btrfs >/dev/null 2>&1 || missing_debs+=(btrfs-progs)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing_debs+=(python3-venv)

if [ ${#missing_debs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    say "missing Debian packages: ${missing_debs[*]}"
    say "run as root:  apt-get update && apt-get install -y ${missing_debs[*]}"
    exit 1
  fi
  say "installing Debian packages: ${missing_debs[*]} (apt-get, about a minute)"
  # The lab makes its own PostgreSQL clusters; don't let the package create and start one.
  mkdir -p /etc/postgresql-common
  if [ ! -f /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.conf
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing_debs[@]}" >/dev/null
  say "Debian packages installed"
fi

stamp="$VENV/.drflow-installed"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv $VENV with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing Python packages into $VENV (pip, a few minutes on a fresh machine)"
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install --upgrade pip && "$VENV/bin/python" -m pip install -e '.[dev]'; } >"$log" 2>&1; then
    tail -n 30 "$log"
    say "pip install failed; the whole output is in $log"
    exit 1
  fi
  echo "$want" > "$stamp"
  say "Python packages installed"
fi
