#!/usr/bin/env bash
# Screenshots of what TensorBoard shows for a run folder: the "Custom Scalars" tab, where the
# sweep draws every solver against NFE on one chart per metric and the training callback draws
# BA against the baselines at each budget over training steps.
#
#   docs/digits/dashboard_screenshots.sh LOGDIR OUT.png [PORT]
#
# Needs Debian's chromium (apt-get install chromium); serves LOGDIR on localhost only.
set -euo pipefail
logdir=${1:?usage: $0 LOGDIR OUT.png [PORT]}
out=${2:?usage: $0 LOGDIR OUT.png [PORT]}
port=${3:-6123}
here=$(cd "$(dirname "$0")/../.." && pwd)
"$here/.venv/bin/tensorboard" --logdir "$logdir" --host 127.0.0.1 --port "$port" >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/data/logdir" >/dev/null && break
    sleep 1
done
sleep 5  # let TensorBoard finish reading the event files
profile=$(mktemp -d)
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
    --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
    --window-size=1500,1900 --virtual-time-budget=30000 --screenshot="$out" \
    "http://127.0.0.1:$port/?darkMode=false#${TAB:-custom_scalars}" >/dev/null 2>&1
rm -rf "$profile"
echo "wrote $out"
