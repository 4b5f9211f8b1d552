#!/bin/sh
# The compose `init` service: create the users bucket with 3 replicas (one per node) and the
# first admin user, then exit. Safe to run again: an existing admin record is left as it is,
# and a bucket with another replica count is refused (exit 2) rather than changed.
#
# Connection settings come from the environment, as for every callout command
# (CALLOUT_NATS_URL, CALLOUT_NKEY_SEED_FILE); the admin's public key from a file.
set -u

admin_key_file="${ADMIN_PUBLIC_KEY_FILE:-/etc/callout/admin.pub}"
attempts="${INIT_ATTEMPTS:-30}"
admin_key="$(cat "$admin_key_file")" || exit 2

# Right after `docker compose up` the cluster may still be electing its JetStream leaders, so
# the first attempts can fail with a store error: retry for about a minute.
n=1
while :; do
    if callout users --replicas 3 get "$admin_key" >/dev/null 2>&1; then
        echo "init: admin $admin_key already present; nothing to do"
        exit 0
    fi
    if callout users --replicas 3 add "$admin_key" --name admin --admin; then
        echo "init: users bucket ready (3 replicas), admin $admin_key added"
        exit 0
    fi
    if [ "$n" -ge "$attempts" ]; then
        echo "init: giving up after $n attempts" >&2
        exit 1
    fi
    n=$((n + 1))
    sleep 2
done
