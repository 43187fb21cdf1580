#!/usr/bin/env bash
# The two commands a newcomer needs:
#   ./run.sh demo   bootstrap, start the stack, the pipeline, the simulators and the console
#   ./run.sh test   bootstrap, then the whole test suite against real servers
set -euo pipefail
cd "$(dirname "$0")"
cmd=${1:-}; shift || true
case "$cmd" in
  demo)
    scripts/bootstrap.sh
    exec .venv/bin/cityops demo "$@" ;;
  test)
    scripts/bootstrap.sh
    exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" ;;
  *)
    echo "usage: ./run.sh demo | ./run.sh test [pytest args]" >&2; exit 2 ;;
esac
