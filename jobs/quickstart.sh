#!/usr/bin/env bash
# The main job end to end, locally, on built-in sample data and a tiny RANDOM-WEIGHT checkpoint:
# installs the project into .venv, writes samples and the checkpoint under .quickstart/, starts a
# local Ray head, runs `ray job submit --working-dir . -- python jobs/caption_videos.py ...`
# against it, prints where the Parquet output is and some of its rows, and stops the head.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/setup_env.sh
source .venv/bin/activate
export RAY_AUTH_MODE=token  # `ray start` enables token auth; this makes the CLI send the token
export HF_HUB_OFFLINE=1

WORK=$PWD/.quickstart  # ignored by git, so `--working-dir .` does not upload it
rm -rf "$WORK/output"
mkdir -p "$WORK"
python -m pipeline.testing.samples "$WORK/samples"
python -m pipeline.testing.tiny_model "$WORK/tiny-llava-onevision" 2>/dev/null

RAY_TMP=$(mktemp -d /tmp/ray-quickstart-XXXX)
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
GCS_PORT=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 ray start --head --block --num-cpus 4 --port "$GCS_PORT" --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" \
  --temp-dir "$RAY_TMP" --disable-usage-stats > "$WORK/ray-head.log" 2>&1 &
HEAD_PID=$!
stop_head() { kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; rm -rf "$RAY_TMP"; }
trap stop_head EXIT
ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
for _ in $(seq 60); do ray job list --address "$ADDRESS" >/dev/null 2>&1 && break; sleep 2; done

ray job submit --address "$ADDRESS" --working-dir . -- \
  python jobs/caption_videos.py \
    --manifest "$WORK/samples/manifest.jsonl" \
    --output "$WORK/output/captions" \
    --model "$WORK/tiny-llava-onevision" \
    --max-new-tokens 16

python - "$WORK/output/captions" <<'PY'
import sys
import pandas as pd
out = sys.argv[1]
df = pd.read_parquet(out)
pd.set_option("display.width", 160, "display.max_colwidth", 40)
print(f"\nOutput: {out}/ ({len(df)} rows; Parquet, one row per (id, prompt))\n")
print(df[["id", "media_type", "status", "error_type", "num_frames", "prompt", "text"]].to_string(index=False))
PY
cat <<MSG

These captions are NOISE: the checkpoint in .quickstart/tiny-llava-onevision has random weights.
For real captions change one argument:  --model llava-hf/llava-onevision-qwen2-0.5b-ov-hf
(or a local folder or an s3:// copy of it).
MSG
