#!/usr/bin/env bash
# The checks for a session that is lent a CUDA GPU, as one script (the lease is short: run it once).
#
# The GPU machine has its own python3 with torch, Triton, transformers and PEFT, and no network, so
# `make test-gpu` (which builds .venv from the index) cannot run there. Prepare here, once:
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl google-re2==1.1.20251105
#   mkdir -p .gpu/smollm2-shape && cp <converted SmolLM2 dir>/{*.json,*.jinja} .gpu/smollm2-shape/
# (SmolLM2's config and tokenizer, no weights: its 540 MB do not travel; the throughput benchmarks
# run on random weights of its shapes, which cost the same time.) Then run this script there with
# `.whl` and `.gpu` carried. Results land in $OUT; copy the figures into bench/RESULTS.md by hand.
set -u
OUT=${OUT:-/tmp/loramux-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export LORAMUX_TEST_TOKENIZER=$PWD/.gpu/smollm2-shape

step() {  # step NAME SECONDS COMMAND...: its output in $OUT/NAME.log, its tail and time here
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    echo "=== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "=== $name: rc=$? in $((SECONDS - start)) s"
    tail -n "${TAIL:-15}" "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    python3 -c "import sys, torch, triton, transformers, peft; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
    nproc
} 2>&1 | tee "$OUT/machine.txt"

# every `gpu` test: the Triton kernels compiled, and the whole engine on the GPU against PEFT
TAIL=40 step tests 240 python3 -m pytest -p no:cacheprovider -m gpu tests/kernels tests/test_engine_gpu.py \
    -q -rfE -n 8 -o junit_logging=system-out --junitxml="$OUT/junit.xml"
grep -ho "torch\.[a-z0-9]* [a-z]*: relative error[^<]*\|torch\.[a-z0-9]* greedy:[^<]*" "$OUT/junit.xml" | sort | uniq

# the compact-form kernels against plain LoRA's, per projection group of one SmolLM2 layer
step compact_kernels 90 python3 -m bench.compact_kernels --json "$OUT/compact_kernels.json"

# SmolLM2's shapes with random weights, for the engine and formats benchmarks
MODEL=/tmp/smollm2-random
step random_model 120 python3 -c "
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, LlamaForCausalLM
source, target = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
LlamaForCausalLM(AutoConfig.from_pretrained(source)).save_pretrained(target)
for f in source.iterdir():
    if f.name != 'config.json':
        shutil.copy(f, target / f.name)
print(sorted(p.name for p in target.iterdir()))
" .gpu/smollm2-shape "$MODEL"

step formats 180 python3 -m server.cli bench formats --model "$MODEL" --device cuda --batch 32 --json
# host-bound or kernel-bound: wall time per step against the GPU's busy time (torch.profiler)
TAIL=4 step profile 150 python3 -m bench.gpu_profile --model "$MODEL" --batch 32 --tables
grep '^{' "$OUT/profile.log"
if [ "${ENGINE:-0}" = 1 ]; then  # ENGINE=1: our engine against transformers generate, too
    for batch in 1 32; do
        step "engine_b$batch" 100 python3 -m server.cli bench engine --model "$MODEL" --device cuda \
            --batch "$batch" --new-tokens 64 --prompt-tokens 64 --repeats 3 --json
    done
fi
