#!/usr/bin/env bash
# The test suite: set-up (idempotent), then pytest. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
cd "$REPO_ROOT"
exec python -m pytest -q "$@"
