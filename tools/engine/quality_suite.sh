#!/usr/bin/env bash
# The whole quality suite of docs/quality.md in one command, timed:
#   1. fidelity with statistics: 16 book windows at 1024, 2048, 4096 and 7936 tokens, the ten
#      methods at 10/20/40% (defkv eval), CSV + per-window CSV + SVG;
#   2. the RULER-style tasks: the full-cache filter on the six tasks at 1024, 2048 and 4096
#      tokens, then every method, budget and mode on the kept pairs, 20 trials (defkv tasks),
#      CSV + SVG.
# Usage: tools/engine/quality_suite.sh [OUTDIR]   (default: quality-suite/ in the current directory)
# Environment: DEFKV (the defkv program; default build/tools/defkv, else defkv on PATH),
#   DEFKV_SUITE_THREADS (settings side by side; default: the number of cores),
#   DEFKV_SUITE_PARTS ("fidelity tasks" by default; one of them to run a part alone),
#   DEFKV_SUITE_WINDOWS / DEFKV_SUITE_TRIALS (16 / 20 by default: fewer for a quick, smaller run;
#   each part's time is roughly linear in them).
# The model and the text must be cached (tools/engine/fetch_assets.sh). Each part's output goes
# to OUTDIR/<part>.txt (progress and timing to <part>.err); the wall time of each part and of the
# whole suite is printed at the end and written to OUTDIR/times.txt.
set -euo pipefail

out="${1:-quality-suite}"
defkv="${DEFKV:-}"
if [ -z "$defkv" ]; then
  if [ -x build/tools/defkv ]; then defkv=build/tools/defkv; else defkv="$(command -v defkv || true)"; fi
fi
[ -n "$defkv" ] && [ -x "$defkv" ] || { echo "quality_suite: no defkv program (build it, or set DEFKV)" >&2; exit 2; }
threads="${DEFKV_SUITE_THREADS:-$(nproc)}"
parts="${DEFKV_SUITE_PARTS:-fidelity tasks}"
windows="${DEFKV_SUITE_WINDOWS:-16}"
trials="${DEFKV_SUITE_TRIALS:-20}"
methods=snapkv,ada-snapkv,criticalkv,ada-criticalkv,defensivekv,layer-defensivekv,streamingllm,knorm,tova,random
mkdir -p "$out"
: > "$out/times.txt"

run_part() {  # name, then the defkv arguments
  local name="$1"; shift
  local t0=$SECONDS
  echo "quality_suite: $name: $defkv $*" >&2
  if ! "$defkv" "$@" > "$out/$name.txt" 2> "$out/$name.err"; then
    echo "quality_suite: $name failed; see $out/$name.err" >&2
    tail -n 5 "$out/$name.err" >&2
    exit 1
  fi
  local s=$((SECONDS - t0))
  printf '%-10s %4d min %02d s\n' "$name" $((s / 60)) $((s % 60)) | tee -a "$out/times.txt"
}

start=$SECONDS
for part in $parts; do
  case "$part" in
    fidelity)
      run_part fidelity eval --contexts 1024,2048,4096,7936 --samples "$windows" --budgets 10%,20%,40% \
        --methods "$methods" --no-passkey --threads "$threads" \
        --csv "$out/fidelity.csv" --svg "$out/fidelity.svg" ;;
    tasks)
      run_part tasks tasks --contexts 1024,2048,4096 --trials "$trials" --budgets 10%,20%,40% \
        --methods "$methods" --threads "$threads" --csv "$out/tasks.csv" --svg "$out/tasks.svg" ;;
    *) echo "quality_suite: unknown part '$part' (fidelity, tasks)" >&2; exit 2 ;;
  esac
done
s=$((SECONDS - start))
printf '%-10s %4d min %02d s (%d threads, %s cores, %s windows, %s trials)\n' total $((s / 60)) $((s % 60)) \
  "$threads" "$(nproc)" "$windows" "$trials" |
  tee -a "$out/times.txt"
