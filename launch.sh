#!/usr/bin/env bash
# Set up (first run only) and start the web UI: ./launch.sh [--port N] [--listen] [--share] [--api] ...
set -euo pipefail
cd "$(dirname "$0")"
source scripts/venv.sh
ensure_venv requirements.txt
export HF_HUB_OFFLINE=1
exec .venv/bin/python app.py "$@"
