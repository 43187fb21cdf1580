#!/usr/bin/env bash
# Bring a fresh Debian/Ubuntu machine to the point where cityops runs: the Debian
# packages of the real servers (Java 17 and Maven for Apache Kafka, whose jars the first
# `cityops stack up` fetches from Maven Central into ~/.cache/cityops), a .venv with the
# project and its dev extras.
# Idempotent and quick when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

# "program-or-file package": a package is installed only when what it provides is absent
# (node and npm may come from another repository that bundles npm into nodejs).
NEEDS=(
  "/usr/sbin/mosquitto mosquitto"
  "mosquitto_pub mosquitto-clients"
  "/usr/lib/postgresql/15/bin/initdb postgresql"
  "/usr/share/postgresql/15/extension/pg_partman.control postgresql-15-partman"
  "prometheus prometheus"
  "promtool prometheus"
  "/usr/bin/chromium chromium"
  "node nodejs"
  "npm npm"
  "java openjdk-17-jre-headless"
  "mvn maven"
)
missing=()
for need in "${NEEDS[@]}"; do
  what=${need% *}; pkg=${need#* }
  if [[ $what == /* ]]; then [ -e "$what" ] && continue; else command -v "$what" >/dev/null && continue; fi
  [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
done
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts some services on install; cityops runs its own instances on its own ports.
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.cityops-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing cityops and its dev extras into .venv"
  .venv/bin/python -m pip install -q --upgrade pip 2>/dev/null
  .venv/bin/python -m pip install -q -e ".[dev]" 2> .venv/pip-install.log || { cat .venv/pip-install.log >&2; exit 1; }
  echo "$want" > "$stamp"
fi

# The console's browser libraries (MapLibre GL, uPlot, i18next; axe-core for the browser
# tests) come from npm, pinned by the lock file, and the console serves them itself: an
# operations center's wall must not depend on a CDN. npm's cache stays in ~/.npm.
web=alerts/console/web
wstamp=$web/node_modules/.cityops-installed
wwant=$(sha256sum $web/package-lock.json | cut -d' ' -f1)
if [ ! -f "$wstamp" ] || [ "$(cat "$wstamp")" != "$wwant" ]; then
  echo "bootstrap: installing the console's browser libraries from npm"
  (cd $web && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  echo "$wwant" > "$wstamp"
fi
