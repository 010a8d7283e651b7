#!/usr/bin/env bash
# Install everything dihn_dist needs: Debian packages, .venv, the package with its test extra.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
setup_all
log "ready: $VENV/bin/python -m dihn_dist.train --help"
