#!/usr/bin/env bash
# The seeded chaos run with any numbers: a two-round world_size-2 campaign with a judge on the
# real coordinator and two `worker join` processes, while N random SIGKILLs (coordinator or a
# worker, restarted at once) are spread over its phases. Prints every kill and a summary: kills
# per process, phases hit, result, attempts (lost / failed), digest equality with a run without
# kills, wall time. Exit status 0 iff the campaign succeeded with the reference's student.
#
#   scripts/chaos.sh [--kills N] [--seed S] [--store redb|sled]
#   (defaults: 12 kills, a random seed, printed; the coordinator's default store engine)
set -euo pipefail
kills=12
seed=""
store="${DISTILLERY_STORE:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills="${2:?--kills needs a number}"; shift 2 ;;
    --seed) seed="${2:?--seed needs a number}"; shift 2 ;;
    --store) store="${2:?--store needs redb or sled}"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "chaos.sh: unknown argument $1 (use --kills N --seed S --store redb|sled)" >&2; exit 2 ;;
  esac
done
case "$store" in ""|redb|sled) ;; *) echo "chaos.sh: --store takes redb or sled, not $store" >&2; exit 2 ;; esac
case "$kills$seed" in *[!0-9]*) echo "chaos.sh: --kills and --seed take non-negative integers" >&2; exit 2 ;; esac
if [ -z "$seed" ]; then
  seed=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
fi
cd "$(dirname "$0")/.."
echo "chaos.sh: seed $seed, $kills kills, store ${store:-default}"
if [ -n "$store" ]; then export DISTILLERY_STORE="$store"; else unset DISTILLERY_STORE; fi
DISTILLERY_CHAOS_SEED="$seed" DISTILLERY_CHAOS_KILLS="$kills" \
  cargo test -p distillery-tests --test chaos -- --exact \
  a_two_round_campaign_survives_seeded_random_kills_with_the_same_student --nocapture
