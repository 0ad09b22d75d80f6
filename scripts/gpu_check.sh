#!/usr/bin/env bash
# GPU check: the tests marked `gpu` (tests/train/test_gpu.py: DDP over NCCL, bf16 / fp16 autocast,
# DeepSpeed ZeRO-2, predict, the CPU fast paths stepping aside) and one epoch of CSI300 on one GPU
# worker, as a throughput figure. Aimed at under 5 minutes on one GPU once CSI300 is prepared.
#
#   scripts/gpu_check.sh OUT_DIR
#
# Writes OUT_DIR/gpu_check.json (device, versions, commit, test counts, the epoch's figures),
# OUT_DIR/gpu_tests.xml and the logs. Exits 2 at once, saying why, where torch sees no CUDA device.
#
# Environment: PYTHON (default .venv/bin/python; it needs a CUDA build of torch 2.13),
# CSI300_DIR (prepared CSI300, default data/csi300; prepared there from
# $FVAE_SHARED_DIR/data/cn_csi300, default ../shared, when missing: about a minute),
# GPU_CHECK_PRECISION (the epoch's train.precision, default bf16).
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: scripts/gpu_check.sh OUT_DIR" >&2
    exit 64
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$1" && OUT="$(cd "$1" && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
CSI300_DIR="${CSI300_DIR:-$REPO/data/csi300}"
SHARED="${FVAE_SHARED_DIR:-$REPO/../shared}"
PRECISION="${GPU_CHECK_PRECISION:-bf16}"
START=$(date +%s)

# 1. CUDA, before anything slow
if ! "$PYTHON" - >"$OUT/device.json" 2>"$OUT/device.log" <<'EOF'
import json, sys
import torch
if not torch.cuda.is_available():
    build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build (install a CUDA wheel of the same version)"
    print(f"gpu_check: torch {torch.__version__}, {build}, sees no CUDA device; run this on a GPU machine", file=sys.stderr)
    sys.exit(2)
print(json.dumps({"device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                  "torch": torch.__version__, "cuda": torch.version.cuda,
                  "nccl": ".".join(map(str, torch.cuda.nccl.version()))}))
EOF
then
    cat "$OUT/device.log" >&2
    exit 2
fi
echo "gpu_check: $(cat "$OUT/device.json")"

# 2. the gpu tests (pytest-timeout bounds each; the whole step is bounded too)
timeout 180 "$PYTHON" -m pytest -q -m gpu tests/train/test_gpu.py --junitxml="$OUT/gpu_tests.xml" \
    >"$OUT/gpu_tests.log" 2>&1
TESTS_RC=$?
tail -3 "$OUT/gpu_tests.log"

# 3. one epoch of CSI300 on one GPU worker
if [[ ! -f "$CSI300_DIR/manifest.json" ]]; then
    echo "gpu_check: preparing CSI300 into $CSI300_DIR"
    timeout 150 "$PYTHON" -m fvae_dist.cli prepare --source "$SHARED/data/cn_csi300/stocks_daily.parquet" \
        --membership "$SHARED/data/cn_csi300/csi300_membership.csv" \
        --train 2010-01-01:2017-12-31 --valid 2018-01-01:2018-12-31 --test 2019-01-01:2020-12-31 \
        --out "$CSI300_DIR" >"$OUT/prepare.log" 2>&1 || echo "gpu_check: prepare failed (see $OUT/prepare.log)"
fi
RUN="gpu-check-$(date +%Y%m%d-%H%M%S)"
CPUS=$(( $(nproc) > 5 ? 4 : 1 ))  # the worker's CPUs (batch padding, its input); Ray Data keeps the rest
EPOCH_START=$(date +%s)
timeout 200 "$PYTHON" -m fvae_dist.cli train --config tune_configs/csi300.yaml "data.dataset_dir=$CSI300_DIR" \
    ray.use_gpu=true ray.num_workers=1 "ray.cpus_per_worker=$CPUS" train.epochs=1 \
    train.early_stopping_patience=0 "train.precision=$PRECISION" data.test_split=none \
    "ray.storage_path=$OUT/runs" "ray.run_name=$RUN" >"$OUT/epoch.log" 2>&1
EPOCH_RC=$?
EPOCH_WALL=$(( $(date +%s) - EPOCH_START ))
tail -4 "$OUT/epoch.log"

# 4. the JSON
"$PYTHON" - "$OUT" "$RUN" "$TESTS_RC" "$EPOCH_RC" "$EPOCH_WALL" "$START" "$PRECISION" <<'EOF'
import json, subprocess, sys, time, xml.etree.ElementTree as ET
from pathlib import Path
out, run, tests_rc, epoch_rc, epoch_wall, start, precision = sys.argv[1:]
out = Path(out)
result = {"date": time.strftime("%Y-%m-%d %H:%M"), **json.loads((out / "device.json").read_text())}
result["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
tests = {"exit_code": int(tests_rc)}
if (out / "gpu_tests.xml").is_file():
    suite = ET.parse(out / "gpu_tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")})
    tests["failed"] = [case.get("name") for case in suite.iter("testcase")
                       if case.find("failure") is not None or case.find("error") is not None]
result["tests"] = tests
epoch = {"exit_code": int(epoch_rc), "wall_s": int(epoch_wall), "precision": precision, "workers": 1}
metrics = out / "runs" / run / "metrics.json"
if metrics.is_file():
    history = json.loads(metrics.read_text()).get("history") or [{}]
    first = history[0]
    epoch.update({"epoch_s": first.get("perf_epoch_seconds"), "stock_days_per_s": first.get("perf_stock_days_per_s"),
                  "data_wait": first.get("perf_data_wait_fraction"), "valid_rank_ic": first.get("valid_rank_ic"),
                  "worker_peak_rss_mb": first.get("perf_peak_rss_mb")})
result["csi300_epoch"] = epoch
result["total_s"] = int(time.time()) - int(start)
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result, indent=1))
EOF
[[ $TESTS_RC -eq 0 && $EPOCH_RC -eq 0 ]]
