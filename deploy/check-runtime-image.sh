#!/usr/bin/env bash
# Checks the runtime stage of deploy/Dockerfile where no image registry is reachable (as on the
# machines this project is developed on): a Debian bookworm made with debootstrap from Debian's
# packages stands in for debian:bookworm-slim, the binaries built here (cargo build) are copied in
# as the build stage would, and `coordinator demo` runs in the image as its user — inside a
# podman build step with chroot isolation, since this kind of machine's container runtime cannot
# start containers (hybrid cgroups, rlimits). Needs root, podman and debootstrap
# (apt-get install podman debootstrap). It does not check the build stage (rust image).
#   deploy/check-runtime-image.sh [PROFILE]     (default debug: target/debug/{coordinator,worker})
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PROFILE=${1:-debug}
WORK=${WORK:-/tmp/distillery-image-check}
for b in coordinator worker; do
  [ -x "$ROOT/target/$PROFILE/$b" ] || { echo "check-runtime-image: build $b first (cargo build --bin $b${PROFILE:+, profile $PROFILE})" >&2; exit 2; }
done
command -v podman >/dev/null && command -v debootstrap >/dev/null || {
  echo "check-runtime-image: needs podman and debootstrap (apt-get install podman debootstrap)" >&2; exit 2; }
P="podman --cgroup-manager=cgroupfs"
mkdir -p "$WORK/ctx"
if ! $P image exists localhost/debian-bookworm-minbase; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian
  tar -C "$WORK/rootfs" -c . | $P import - localhost/debian-bookworm-minbase
fi
cp "$ROOT/target/$PROFILE/coordinator" "$ROOT/target/$PROFILE/worker" "$WORK/ctx/"
strip --strip-all "$WORK/ctx/coordinator" "$WORK/ctx/worker"
# deploy/Dockerfile's runtime stage on the stand-in base, less its apt-get (no registry or mirror
# is needed for the demo).
sed -n '/^FROM debian:bookworm-slim/,$p' "$ROOT/deploy/Dockerfile" \
  | sed -e 's|^FROM debian:bookworm-slim|FROM localhost/debian-bookworm-minbase|' \
        -e 's|^COPY --from=build /out/coordinator /out/worker|COPY coordinator worker|' \
        -e 's|^RUN apt-get update \\$|RUN true \\|' \
        -e '/^ && apt-get/d; /^ && rm -rf \/var\/lib\/apt/d' > "$WORK/ctx/Containerfile"
$P build --isolation=chroot -t localhost/distillery:check "$WORK/ctx"
printf 'FROM localhost/distillery:check\nRUN coordinator demo --plain --dir /data/demo --teacher-seconds 30\n' > "$WORK/ctx/Containerfile.demo"
$P build --isolation=chroot -f "$WORK/ctx/Containerfile.demo" -t localhost/distillery:check-demo "$WORK/ctx"
echo "check-runtime-image: coordinator demo ran in the runtime image (localhost/distillery:check)"
