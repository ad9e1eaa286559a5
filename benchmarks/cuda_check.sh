#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one command for a session that is lent one (about 6-9 minutes
# on an H100/H200; most of it torch.compile): the CUDA-only tests, then `resnetlab bench train` of
# ResNet-20 and ResNet-56, eager against compiled with CUDA graphs (`--compile reduce-overhead`;
# benchmarks/RESULTS-cuda.md has the H200's), then benchmarks/profile_step.py of fast-cifar steps.
# Run from the repository root with a CUDA build of torch; resnetlab itself is taken from src/ (no
# install needed).
#
#   bash benchmarks/cuda_check.sh [OUT_DIR]        # default: $OUT, else cuda-check/
#
# OUT_DIR gets tests.log, one JSON per benchmark (`bench train --json`) and one profile*.txt per
# profile; a summary table is printed at the end. A missing dependency (pydantic, say) stops it at
# once with its name.
set -uo pipefail
out=${1:-${OUT:-cuda-check}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" - <<'EOF' || exit 1
import sys
import torch
try:
    import resnetlab.cli  # noqa: F401  (imports every dependency the commands below need)
except ImportError as error:
    sys.exit(f"cuda_check: {error}; install resnetlab's dependencies first")
if not torch.cuda.is_available():
    sys.exit("cuda_check: torch sees no CUDA device")
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}")
EOF

"$py" -m pytest -q -p no:cacheprovider -rs -k cuda \
    tests/test_compile.py tests/test_evaluate.py tests/test_data_loader.py 2>&1 | tee "$out/tests.log"

bench() {  # NAME ARGS...: one `bench train --json`, its JSON kept, its errors shown
    local name=$1
    shift
    if "$py" -m resnetlab bench train "$@" --json >"$out/$name.json" 2>"$out/$name.err"; then
        echo "$name: done"
    else
        echo "$name: failed: $(tail -n 1 "$out/$name.err")"
    fi
}
# Long windows: a CIFAR ResNet step takes milliseconds on these GPUs.
bench resnet20-fp32-eager --model resnet20 --precision fp32 --no-compile --steps 600 --warmup-steps 50
bench resnet20-fp32-cudagraphs --model resnet20 --precision fp32 --compile reduce-overhead --steps 600 --warmup-steps 50
bench resnet20-bf16-cudagraphs --model resnet20 --precision bf16 --compile reduce-overhead --steps 600 --warmup-steps 50
bench resnet56-fp32-eager --model resnet56 --precision fp32 --no-compile --steps 300 --warmup-steps 30
bench resnet56-fp32-cudagraphs --model resnet56 --precision fp32 --compile reduce-overhead --steps 300 --warmup-steps 30

# Host time per step of a whole fast-cifar step (EMA, label smoothing, batch 64), with CUDA graphs
# (the default on CUDA) and eager: what is left to take out of the training loop around the graphs.
# The last: CUDA graphs with gradient accumulation (two replays per step; auto keeps such runs eager).
for args in "--batch 64" "--batch 128" "--batch 64 --compile none" "--batch 128 --accum-steps 2 --compile reduce-overhead"; do
    name="profile$(echo "$args" | tr -d ' -' )"
    "$py" benchmarks/profile_step.py $args --device cuda >"$out/$name.txt" 2>&1 \
        && head -n 3 "$out/$name.txt" || echo "$name: failed: $(tail -n 1 "$out/$name.txt")"
done

"$py" - "$out" <<'EOF'
import json, pathlib, sys
print("| benchmark | images/s | MFU | peak GFLOP/s |\n|---|---:|---:|---:|")
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        result = json.loads(path.read_text())["resnetlab"]
    except (ValueError, KeyError):
        continue  # its failure was printed above
    print(f"| {path.stem} | {result['images_per_s']:,.0f} | {result['mfu']:.3f} | {result['peak_gflops']:,.0f} |")
EOF
