#!/bin/bash
# What one message costs PostgreSQL in reads of the tables a send touches: a throwaway cluster
# (target/debug/limbic-test-postgres), one node of LIMBIC_BIN on it, two users in one room
# sending 200 messages one after another while SYNCERS other members (default 0) long-poll
# /sync, and the tables' index and sequential scans (pg_stat_user_tables) per message. An insert
# with ON CONFLICT counts one scan of its table.
#   bench/pg_scans.sh target/debug/limbic before [SYNCERS]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "$1"); LABEL=$2; SYNCERS=${3:-0}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
mkdir db-$LABEL
coproc PG { "$ROOT/target/debug/limbic-test-postgres"; }
echo meas >&${PG[1]}
read -u ${PG[0]} URL
PORT=$(( 20000 + RANDOM % 5000 ))
cat > cfg-$LABEL.toml <<CFG
server_name = "test.local"
[listen]
address = "127.0.0.1"
port = $PORT
[database]
path = "$WORK/db-$LABEL/db"
backend = "postgres"
url = "$URL"
pool_size = 4
[cluster]
node_name = "a"
[logging]
level = "warn"
[registration]
mode = "open"
shared_secret = "test-shared-secret-0123456789abcdef"
[rate_limits]
enabled = false
CFG
$BIN serve --config cfg-$LABEL.toml > server-$LABEL.log 2>&1 &
SPID=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$PORT/_matrix/client/versions >/dev/null && break; sleep 0.2; done
DB=${URL##*/}; PGURL=${URL%/*}/$DB
"$ROOT/.venv/bin/python" - "$PORT" "$PGURL" "$SYNCERS" <<'PY'
import sys, requests, subprocess, threading, time, uuid
port, pg, syncers = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
def reg(name):
    r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy"}})
    if r.status_code == 401:
        r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy", "session": r.json()["session"]}})
    r.raise_for_status(); return r.json()["access_token"]
a = reg("alice"); b = reg("bob")
room = requests.post(f"{base}/_matrix/client/v3/createRoom", headers={"Authorization": "Bearer "+a}, json={"preset": "public_chat"}).json()["room_id"]
requests.post(f"{base}/_matrix/client/v3/join/{room}", headers={"Authorization": "Bearer "+b}, json={}).raise_for_status()
done = threading.Event()
def sync_until_done(token):
    since = requests.get(f"{base}/_matrix/client/v3/sync", headers={"Authorization": "Bearer "+token}).json()["next_batch"]
    while not done.is_set():
        since = requests.get(f"{base}/_matrix/client/v3/sync", params={"since": since, "timeout": "2000"}, headers={"Authorization": "Bearer "+token}).json()["next_batch"]
threads = []
for n in range(syncers):
    token = reg(f"syncer{n}")
    requests.post(f"{base}/_matrix/client/v3/join/{room}", headers={"Authorization": "Bearer "+token}, json={}).raise_for_status()
    threads.append(threading.Thread(target=sync_until_done, args=(token,), daemon=True))
for thread in threads:
    thread.start()
def scans():
    time.sleep(1.5)
    out = subprocess.run(["psql", pg, "-Atc", "select pg_stat_force_next_flush(); select relname, coalesce(idx_scan,0)+coalesce(seq_scan,0) from pg_stat_user_tables where relname in ('limbic_pdus','limbic_room_state','limbic_txn_ids','limbic_access_tokens') order by 1"], capture_output=True, text=True).stdout
    return dict(l.split("|") for l in out.split("\n") if "|" in l)
before = scans()
N = 200
for i in range(N):
    tok = a if i % 2 == 0 else b
    requests.put(f"{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{uuid.uuid4().hex}", headers={"Authorization": "Bearer "+tok}, json={"msgtype": "m.text", "body": f"m{i}"}).raise_for_status()
time.sleep(1)
done.set()
for thread in threads:
    thread.join()
after = scans()
for k in sorted(after):
    print(f"{k}: {(int(after[k]) - int(before.get(k, 0))) / N:.2f} scans per message")
PY
kill $SPID; wait $SPID 2>/dev/null || true
kill $PG_PID 2>/dev/null || true
