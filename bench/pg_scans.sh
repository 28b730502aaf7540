#!/bin/bash
# What PostgreSQL reads for Limbic: a throwaway cluster (target/debug/limbic-test-postgres), one
# node of LIMBIC_BIN on it, and the tables' index and sequential scans (pg_stat_user_tables; an
# insert with ON CONFLICT counts one scan of its table) over one of two loads:
# - sends (the default): two users in one room sending 200 messages one after another while
#   SYNCERS other members (default 0) long-poll /sync; scans per message;
# - `--initial ROOMS`: one user in ROOMS named rooms of 3 messages each; once the node has rested
#   (its kept state dropped), one initial sync; scans of every table it read.
#   bench/pg_scans.sh target/debug/limbic before [SYNCERS]
#   bench/pg_scans.sh target/debug/limbic before --initial 200
set -e
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=$(realpath "$1"); LABEL=$2
if [ "$3" = --initial ]; then MODE=initial; SIZE=${4:-50}; else MODE=send; SIZE=${3:-0}; fi
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
"$ROOT/.venv/bin/python" - "$PORT" "$PGURL" "$MODE" "$SIZE" <<'PY'
import sys, requests, subprocess, threading, time, uuid
port, pg, mode, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
base = f"http://127.0.0.1:{port}"
def reg(name):
    r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy"}})
    if r.status_code == 401:
        r = requests.post(f"{base}/_matrix/client/v3/register", json={"username": name, "password": "pw-"+name+"-long", "auth": {"type": "m.login.dummy", "session": r.json()["session"]}})
    r.raise_for_status(); return r.json()["access_token"]
def scans(wait):
    """Every table's scans so far, once the server's backends have reported them."""
    time.sleep(wait)
    out = subprocess.run(["psql", pg, "-Atc", "select pg_stat_force_next_flush(); select relname, coalesce(idx_scan,0)+coalesce(seq_scan,0) from pg_stat_user_tables order by 1"], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (l.split("|") for l in out.split("\n") if "|" in l)}
def send(a, room, text):
    requests.put(f"{base}/_matrix/client/v3/rooms/{room}/send/m.room.message/{uuid.uuid4().hex}", headers={"Authorization": "Bearer "+a}, json={"msgtype": "m.text", "body": text}).raise_for_status()
a = reg("alice")
if mode == "initial":
    for n in range(size):
        room = requests.post(f"{base}/_matrix/client/v3/createRoom", headers={"Authorization": "Bearer "+a}, json={"preset": "private_chat", "name": f"room {n}"}).json()["room_id"]
        for i in range(3):
            send(a, room, f"m{i}")
    # The node rests after 10 s without writes (its kept state dropped); idle backends report
    # their statistics within 10 s.
    before = scans(12)
    started = time.time()
    r = requests.get(f"{base}/_matrix/client/v3/sync", headers={"Authorization": "Bearer "+a}); r.raise_for_status()
    took = time.time() - started
    after = scans(11)
    read = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    print(f"initial sync of {len(r.json()['rooms']['join'])} rooms: {took * 1000:.0f} ms, {sum(read.values())} scans")
    for k, v in sorted(read.items(), key=lambda kv: -kv[1]):
        print(f"{k}: {v}")
    sys.exit()
b = reg("bob")
room = requests.post(f"{base}/_matrix/client/v3/createRoom", headers={"Authorization": "Bearer "+a}, json={"preset": "public_chat"}).json()["room_id"]
requests.post(f"{base}/_matrix/client/v3/join/{room}", headers={"Authorization": "Bearer "+b}, json={}).raise_for_status()
done = threading.Event()
def sync_until_done(token):
    since = requests.get(f"{base}/_matrix/client/v3/sync", headers={"Authorization": "Bearer "+token}).json()["next_batch"]
    while not done.is_set():
        since = requests.get(f"{base}/_matrix/client/v3/sync", params={"since": since, "timeout": "2000"}, headers={"Authorization": "Bearer "+token}).json()["next_batch"]
threads = []
for n in range(size):
    token = reg(f"syncer{n}")
    requests.post(f"{base}/_matrix/client/v3/join/{room}", headers={"Authorization": "Bearer "+token}, json={}).raise_for_status()
    threads.append(threading.Thread(target=sync_until_done, args=(token,), daemon=True))
for thread in threads:
    thread.start()
WATCHED = ("limbic_access_tokens", "limbic_pdus", "limbic_room_state", "limbic_txn_ids")
before = scans(1.5)
N = 200
for i in range(N):
    send(a if i % 2 == 0 else b, room, f"m{i}")
time.sleep(1)
done.set()
for thread in threads:
    thread.join()
after = scans(1.5)
for k in WATCHED:
    print(f"{k}: {(after.get(k, 0) - before.get(k, 0)) / N:.2f} scans per message")
PY
kill $SPID; wait $SPID 2>/dev/null || true
kill $PG_PID 2>/dev/null || true
