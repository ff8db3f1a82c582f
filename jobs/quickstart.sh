#!/usr/bin/env bash
# The main job end to end, locally, on built-in sample data and a tiny RANDOM-WEIGHT checkpoint:
# installs the project into .venv, writes samples and the checkpoint under .quickstart/, starts a
# local Ray head, runs `ray job submit --working-dir . -- python jobs/caption_videos.py ...`
# against it, prints where the Parquet output is and some of its rows, and stops the head.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/setup_env.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1

WORK=$PWD/.quickstart  # ignored by git, so `--working-dir .` does not upload it
rm -rf "$WORK/output"
mkdir -p "$WORK"
# Token authentication on the local head, with a token of its own (a fresh home has none in ~/.ray):
# the head, its workers, the job's driver and the `ray job` CLI all read it from RAY_AUTH_TOKEN_PATH.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$WORK/ray-auth-token
if [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
  (umask 077 && python -c "import uuid; print(uuid.uuid4().hex, end='')" > "$RAY_AUTH_TOKEN_PATH")
fi
python -m pipeline.testing.samples "$WORK/samples"
python -m pipeline.testing.tiny_model "$WORK/tiny-llava-onevision" 2>/dev/null

RAY_TMP=$(mktemp -d /tmp/ray-quickstart-XXXX)
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
# Free ports of our own for the head and its agents: another Ray on this machine may hold the defaults.
read -r GCS_PORT AGENT_PORT AGENT_GRPC_PORT METRICS_PORT RUNTIME_ENV_PORT < <(python -c "
import socket
socks = [socket.socket() for _ in range(5)]
for s in socks: s.bind(('127.0.0.1', 0))
print(*(s.getsockname()[1] for s in socks))")
RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 ray start --head --block --num-cpus 4 --port "$GCS_PORT" \
  --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --dashboard-agent-listen-port "$AGENT_PORT" \
  --dashboard-agent-grpc-port "$AGENT_GRPC_PORT" --metrics-export-port "$METRICS_PORT" \
  --runtime-env-agent-port "$RUNTIME_ENV_PORT" --temp-dir "$RAY_TMP" --disable-usage-stats > "$WORK/ray-head.log" 2>&1 &
HEAD_PID=$!
stop_head() { kill "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; rm -rf "$RAY_TMP"; }
trap stop_head EXIT
ADDRESS=http://127.0.0.1:$DASHBOARD_PORT
JOB_ID=quickstart-$(date +%s)
# The job server answers before the head's job agent is up ("No available agent"): submit until
# the head takes the job, then follow its logs.
for attempt in $(seq 60); do
  if ray job submit --address "$ADDRESS" --submission-id "$JOB_ID" --no-wait --working-dir . -- \
      python jobs/caption_videos.py \
        --manifest "$WORK/samples/manifest.jsonl" \
        --output "$WORK/output/captions" \
        --model "$WORK/tiny-llava-onevision" \
        --max-new-tokens 16 > "$WORK/submit.log" 2>&1; then
    break
  fi
  if ! kill -0 "$HEAD_PID" 2>/dev/null; then
    tail -5 "$WORK/ray-head.log" >&2
    echo "quickstart: the local Ray head stopped (above; its whole log is $WORK/ray-head.log)" >&2
    exit 1
  fi
  if [ "$attempt" = 60 ] || ! grep -q -e "No available agent" -e "Failed to connect" -e "Connection refused" "$WORK/submit.log"; then
    cat "$WORK/submit.log" >&2
    echo "quickstart: the job could not be submitted (above); the head's log is $WORK/ray-head.log" >&2
    exit 1
  fi
  sleep 2
done
echo "submitted job $JOB_ID to the local Ray head at $ADDRESS; its log follows"
ray job logs --address "$ADDRESS" --follow "$JOB_ID"
STATUS=$(ray job status --address "$ADDRESS" "$JOB_ID" 2>&1 || true)
if ! grep -qi "succeeded" <<<"$STATUS"; then
  echo "$STATUS" >&2
  echo "quickstart: the job did not succeed (its log is above)" >&2
  exit 1
fi

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
