#!/usr/bin/env bash
# The whole test suite on a fresh machine: ./test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv requirements-test.txt
if [ ! -x /usr/bin/chromium ]; then   # the browser tests drive Debian's Chromium through Playwright
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else echo "test.sh: /usr/bin/chromium is missing (apt-get install chromium); browser tests will be skipped" >&2; fi
fi
export HF_HUB_OFFLINE=1
# two workers, each test file whole on one of them (its server and browser start once); TEST_WORKERS=0: serial
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
