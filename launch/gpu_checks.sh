#!/usr/bin/env bash
# One pass of the accelerator checks on a lent GPU, in a fixed time budget:
#   launch/gpu_checks.sh OUT_DIR [SECONDS] [REPRO_CONFIG] [BENCH=1|0]
# 1. the throughput benchmark of the mot_1b config, XLA attention then cuDNN;
# 2. the shapes reproduction (REPRO_CONFIG, default shapes_repro, the CPU
#    reference config) for whatever time is left; it writes its table after every row, so a stopped run still reports the
#    rows it finished and how long each took on this device.
# Python packages the image lacks come from wheels in .whl/ (carry it; .git/info/exclude
# ignores it), and launch/no_tensorflow.py stands in for TensorFlow. The set for the
# image's Python 3.12 is fetched with `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 ... -d .whl` (promise 2.3 is an
# sdist: `pip wheel --no-deps -w .whl promise==2.3`): array-record 0.8.6, clu 0.0.12,
# dm-tree 0.1.10, docstring-parser 0.18.0, googleapis-common-protos 1.76.0, grain 0.2.18,
# immutabledict 4.3.1, ml-collections 1.1.0, portpicker 1.6.0, simple-parsing 0.1.9,
# tensorflow-datasets 4.9.10, tensorflow-metadata 1.21.0, termcolor 3.3.0, toml 0.10.2; and
# in .whl/fallback flax 0.12.8 and orbax-checkpoint 0.12.8, used only when the image's own
# are outside the pins.
set -u
out=${1:?usage: launch/gpu_checks.sh OUT_DIR [SECONDS]}
budget=${2:-560}
repro_config=${3:-shapes_repro}
with_bench=${4:-1}
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Rows share shapes, so later rows and the curve evaluations reuse compiled programs.
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
# flax and orbax outside the versions setup.cfg allows: use the carried ones.
check='from importlib.metadata import version as v; import flax, orbax.checkpoint
ok = v("flax") < "0.13" and v("orbax-checkpoint") < "0.13"
print("flax", v("flax"), "orbax", v("orbax-checkpoint"), "within pins:", ok); exit(0 if ok else 1)'
if ! python3 -c "$check" && [ -d .whl/fallback ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/fallback/*.whl && echo "using the carried flax and orbax"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "
import sys, jax, jaxlib; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  git rev-parse --short HEAD 2>/dev/null || echo "commit ${STROKES_JAX_COMMIT:-unknown} (no git here)"; } 2>&1 | tee "$out/env.txt"

run() {  # run SECONDS NAME ARGS...: one entry point call with its own time cap and log
  local secs=$1 name=$2; shift 2
  echo "== $name (cap ${secs}s, $(left)s left)"
  timeout --signal=INT --kill-after=15 "$secs" python3 launch/no_tensorflow.py "$@" \
    > "$out/$name.log" 2>&1
  echo "== $name rc=$? after $(( $(date +%s) - start ))s"
  grep -v "Warning\|WARNING\|^I0000\|^W0000" "$out/$name.log" | tail -15
}

if [ "$with_bench" = 1 ]; then
  # XLA attention materialises every layer's full score matrices at 8 x 4096 tokens, so it
  # needs far more memory than cuDNN's fused kernel; it stays here as the baseline that
  # cuDNN is measured against.
  run 110 bench_xla bench --config mot_1b --workdir "$out/bench"
  run 90 bench_cudnn bench --config mot_1b --config.model.attention=cudnn \
    --workdir "$out/bench"
fi
run $(( $(left) - 25 )) reproduce reproduce --config "$repro_config" --workdir /tmp/repro
# Everything but checkpoints and the generated data, in one file (the copy-back keeps few).
tar czf "$out/repro.tgz" --exclude=checkpoints --exclude=data -C /tmp repro 2>/dev/null
cp /tmp/repro/reproduction.md "$out/" 2>/dev/null
echo "done after $(( $(date +%s) - start ))s"
