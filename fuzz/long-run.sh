#!/usr/bin/env bash
# The long fuzzing run the README reports: every target in turn, one at a time (one core), at
# the lowest CPU priority, each for SECONDS_PER_RUN (default 540) per pass, passes repeated
# until the targets together have used CPU_SECONDS of CPU time (default 3600: one CPU-hour) or
# MAX_HOURS of wall time have passed (default 6). Each target's corpus grows in <log dir>/corpus
# from fuzz/corpus (never written to); crashes go to <log dir>/artifacts/<target>/.
#
#   fuzz/long-run.sh [log dir]        (default: /tmp/meshlet-fuzz-long-run)
#   TARGETS="detect http1_edge" CPU_SECONDS=1800 fuzz/long-run.sh /tmp/a   # a subset
#
# Needs the nightly toolchain and cargo-fuzz. Writes <log dir>/summary.md: per target the wall
# and CPU time, executions, final corpus size and crashes.
set -euo pipefail
cd "$(dirname "$0")/.."
logs=$(realpath -m "${1:-/tmp/meshlet-fuzz-long-run}")
per_run=${SECONDS_PER_RUN:-540}
cpu_goal=${CPU_SECONDS:-3600}
max_hours=${MAX_HOURS:-6}
target_dir=${FUZZ_TARGET_DIR:-$HOME/.cache/meshlet-tools/fuzz-target}
# TARGETS (space-separated) runs a subset: two runs on disjoint subsets use two cores.
read -r -a targets <<<"${TARGETS:-detect http1_edge admission policy config grpc_health iptables}"
mkdir -p "$logs"
started=$(date -u +%s)
commit=$(git rev-parse --short HEAD)
echo "$(date -u '+%F %T') building (commit $commit)" | tee -a "$logs/progress"
nice -n 19 cargo +nightly fuzz build -s none --target-dir "$target_dir" >"$logs/build.log" 2>&1
bin="$target_dir/x86_64-unknown-linux-gnu/release"

declare -A wall cpu execs corp crashes
for t in "${targets[@]}"; do wall[$t]=0; cpu[$t]=0; execs[$t]=0; corp[$t]=0; crashes[$t]=0; done
total_cpu() {
  local s=0
  for t in "${targets[@]}"; do s=$(awk -v a="$s" -v b="${cpu[$t]}" 'BEGIN {print a + b}'); done
  echo "$s"
}
pass=0
while awk -v c="$(total_cpu)" -v g="$cpu_goal" 'BEGIN {exit !(c < g)}' &&
  (($(date -u +%s) - started < max_hours * 3600)); do
  pass=$((pass + 1))
  for t in "${targets[@]}"; do
    mkdir -p "$logs/corpus/$t" "$logs/artifacts/$t"
    log="$logs/$t.pass$pass.log"
    TIMEFORMAT='%R %U %S'
    set +e
    { time nice -n 19 "$bin/$t" "$logs/corpus/$t" "fuzz/corpus/$t" -max_total_time="$per_run" \
      -timeout=10 -rss_limit_mb=1024 -print_final_stats=1 \
      -artifact_prefix="$logs/artifacts/$t/" >"$log" 2>&1; } 2>"$log.time"
    rc=$?
    set -e
    read -r w u s <"$log.time"
    wall[$t]=$(awk -v a="${wall[$t]}" -v b="$w" 'BEGIN {print a + b}')
    cpu[$t]=$(awk -v a="${cpu[$t]}" -v b="$u" -v c="$s" 'BEGIN {print a + b + c}')
    n=$(awk '/^stat::number_of_executed_units:/ {print $NF}' "$log")
    execs[$t]=$((execs[$t] + ${n:-0}))
    corp[$t]=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | awk '{print $2}')
    if [ "$rc" -ne 0 ]; then crashes[$t]=$((crashes[$t] + 1)); fi
    echo "$(date -u '+%F %T') pass $pass $t: exit $rc, ${w}s wall, $(awk -v u="$u" -v s="$s" 'BEGIN {print u + s}')s CPU, ${n:-?} execs, corpus ${corp[$t]}" |
      tee -a "$logs/progress"
  done
done

{
  echo "Long fuzzing run, $(date -u -d "@$started" '+%F %H:%M') to $(date -u '+%F %H:%M') UTC, commit $commit, $pass pass(es) of ${per_run}s per target, nice -n 19, one target at a time:"
  echo
  echo "| target | wall time | CPU time | executions | corpus | crashes |"
  echo "| --- | --- | --- | --- | --- | --- |"
  tw=0; te=0; tc=0
  for t in "${targets[@]}"; do
    printf '| `%s` | %.0f min | %.1f min | %s | %s | %s |\n' "$t" "$(awk -v a="${wall[$t]}" 'BEGIN {print a / 60}')" \
      "$(awk -v a="${cpu[$t]}" 'BEGIN {print a / 60}')" "${execs[$t]}" "${corp[$t]}" "${crashes[$t]}"
    tw=$(awk -v a="$tw" -v b="${wall[$t]}" 'BEGIN {print a + b}'); te=$((te + execs[$t])); tc=$((tc + crashes[$t]))
  done
  printf '| all | %.0f min | %.1f min | %s | | %s |\n' "$(awk -v a="$tw" 'BEGIN {print a / 60}')" \
    "$(awk -v a="$(total_cpu)" 'BEGIN {print a / 60}')" "$te" "$tc"
} >"$logs/summary.md"
cat "$logs/summary.md"
