#!/usr/bin/env bash
# Builds the CPU image (deploy/Dockerfile) with whichever container builder runs here (docker,
# podman or buildah) and runs `coordinator demo` inside it as a smoke test.
#   deploy/build-image.sh [TAG]        (default distillery:latest)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TAG=${1:-distillery:latest}
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  B=docker
elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
  B=podman
else
  echo "build-image: no container engine runs here (docker needs a daemon, or install podman); see deploy/README.md" >&2
  exit 1
fi
cd "$ROOT"
"$B" build -f deploy/Dockerfile -t "$TAG" .
# The demo in the image: a fresh teacher, two in-process workers, the two-round campaign.
"$B" run --rm "$TAG" coordinator demo --plain --dir /data/demo --teacher-seconds 30
