#!/bin/bash
# What an initial sync costs PostgreSQL in reads: a throwaway cluster (target/debug/limbic-test-postgres),
# one node of LIMBIC_BIN on it, one user in ROOMS named rooms (default 50) of 3 messages each; once
# the node has rested (its kept state dropped), one initial sync, and the index and sequential
# scans of every table it read (pg_stat_user_tables).
#   bench/pg_initial_scans.sh target/debug/limbic [ROOMS]
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "$1"); ROOMS=${2:-50}
WORK=$(mktemp -d)
trap 'kill $SPID 2>/dev/null; rm -rf "$WORK"' EXIT
cd "$WORK"
coproc PG { "$ROOT/target/debug/limbic-test-postgres"; }
echo meas >&${PG[1]}
read -u ${PG[0]} URL
PORT=$(( 20000 + RANDOM % 5000 ))
cat > cfg.toml <<CFG
server_name = "test.local"
[listen]
address = "127.0.0.1"
port = $PORT
[database]
path = "$WORK/db"
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
$BIN serve --config cfg.toml > server.log 2>&1 &
SPID=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:$PORT/_matrix/client/versions >/dev/null && break; sleep 0.2; done
DB=${URL##*/}; PGURL=${URL%/*}/$DB
"$ROOT/.venv/bin/python" - "$PORT" "$PGURL" "$ROOMS" <<'PY'
import sys, requests, subprocess, time, uuid
port, pg, rooms = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = f"http://127.0.0.1:{port}"
def reg(name):
    r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy"}})
    if r.status_code == 401:
        r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy", "session": r.json()["session"]}})
    r.raise_for_status(); return r.json()["access_token"]
a = reg("alice")
for n in range(rooms):
    room = requests.post(f"{base}/_matrix/client/v3/createRoom", headers={"Authorization": "Bearer "+a}, json={"preset": "private_chat", "name": f"room {n}"}).json()["room_id"]
    for i in range(3):
        requests.put(f"{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{uuid.uuid4().hex}", headers={"Authorization": "Bearer "+a}, json={"msgtype": "m.text", "body": f"m{i}"}).raise_for_status()
def scans():
    time.sleep(11)
    out = subprocess.run(["psql", pg, "-Atc", "select pg_stat_force_next_flush(); select relname, coalesce(idx_scan,0)+coalesce(seq_scan,0) from pg_stat_user_tables order by 1"], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (l.split("|") for l in out.split("\n") if "|" in l)}
# a new server process would hold nothing; this one rests after 10 s idle (kept state dropped)
time.sleep(12)
before = scans()
t = time.time()
r = requests.get(f"{base}/_matrix/client/v3/sync", headers={"Authorization": "Bearer "+a}); r.raise_for_status()
took = time.time() - t
after = scans()
diff = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
print(f"initial sync {took*1000:.0f} ms, {len(r.json()['rooms']['join'])} rooms, scans total {sum(diff.values())}")
for k, v in sorted(diff.items(), key=lambda kv: -kv[1]):
    print(f"  {k} {v}")
PY
