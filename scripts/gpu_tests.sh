#!/usr/bin/env bash
# The GPU tests (pytest -m gpu) in parts that each fit a 10-minute call on a GPU machine (about 12 minutes in all
# on an H200). Each part runs under `timeout -s INT`, so that a part cut off by the limit still prints pytest's
# summary and the failures' messages (-rfE, short tracebacks).
#
#   bash scripts/gpu_tests.sh PART [pytest args...]    PART: gluon | random | main | long | all
#
# gluon:  the Hopper (Gluon) kernels: grouped, the overlapped backward, "all" mode's phased backward, grouped-query
#         attention (about 4 minutes, H200)
# random: hypothesis over random specs (tl and Gluon kernels), head_dims, every autotuning candidate, autotuning on
# main:   the rest of the Triton lowering's GPU tests, the torch lowering on CUDA, the nn layer on "auto"
# long:   a tensor past 2^31 elements, CUDA-graph capture, torch.compile
# LIMIT (seconds, default 560) bounds each part. Set DILATED_COMPILER_AUTOTUNE=0 for the fixed tile configs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LIMIT=${LIMIT:-560}
part=${1:?"PART: gluon | random | main | long | all"}
shift
gluon="gluon_kernels or gluon_all_mode_backward or gluon_gqa or overlapped"
random="random or head_dims or every_tile_candidate or autotune_on"
long="past_int32 or cuda_graph or torch_compile"
case "$part" in
  gluon) expr="$gluon" ;;
  random) expr="$random" ;;
  long) expr="$long" ;;
  main) expr="not ($gluon) and not ($random) and not ($long)" ;;
  all)
    rc=0
    for p in gluon random main long; do bash "$0" "$p" "$@" || rc=1; done
    exit $rc ;;
  *) echo "unknown part '$part' (gluon | random | main | long | all)" >&2; exit 2 ;;
esac
echo "== GPU tests, part $part: -k \"$expr\" (limit ${LIMIT} s)"
timeout -s INT "$LIMIT" "$PY" -m pytest -q -m gpu -rfE --tb=short -p no:cacheprovider --durations=5 tests/ -k "$expr" "$@"
rc=$?
# 124: the limit passed before the process ended; pytest prints "KeyboardInterrupt" above its summary when the
# tests themselves were cut off (without it they had finished and only the exit ran past the limit)
[ $rc -eq 124 ] && echo "== part $part: the ${LIMIT} s limit passed (tests cut off only if pytest printed KeyboardInterrupt above)"
exit $rc
