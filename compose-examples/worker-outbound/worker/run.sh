#!/bin/sh
# Calls the cluster's quotes service ROUNDS times, one second apart, and
# exits non-zero if any call fails.
i=1
while [ "$i" -le "${ROUNDS:-3}" ]; do
  reply=$(wget -qO- "$QUOTES_URL/") || { echo "worker: round $i: cannot reach $QUOTES_URL"; exit 1; }
  echo "worker: round $i: $(echo "$reply" | head -n1)"
  i=$((i + 1))
  sleep 1
done
echo "worker: done"
