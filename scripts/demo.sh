#!/usr/bin/env bash
# Set up this machine and run fastmix's main job on its built-in default faces:
#
#   bash scripts/demo.sh [--out DIR] [--batch 16] [--repeats 3]
#
# Installs torch 2.13.0 (CPU), the build tools and the demo dependencies (scikit-image ships the faces,
# matplotlib draws them), builds fastmix, then runs `python -m fastmix.demo`: masks the faces, writes
# DIR/fastmix_demo.png (default ./out) and prints a throughput table for every available backend.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

fastmix_setup "scikit-image==0.26.0" "matplotlib==3.11.2" "pillow==13.0.0"
exec "$PYTHON" -m fastmix.demo "$@"
