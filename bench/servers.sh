# Starting and stopping the benchmarked servers, for scripts/bench and scripts/bench-sfu (sourced;
# they define `say` and `die`, and keep the running server's process id in SERVER_PID).

SERVER_PID=""

# Stops the server SERVER_PID names (its processes, space-separated, for a server of several
# nodes): SIGTERM, then SIGKILL after 10 s.
stop_server() {
  local pids="$SERVER_PID" pid
  [[ -n "$pids" ]] || return 0
  SERVER_PID=""
  for pid in $pids; do
    stop_process "$pid"
  done
}

stop_process() {  # pid
  local pid="$1"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do  # up to 10 s
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      say "process $pid ignored SIGTERM, sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# Waits until `url` answers, for at most 120 s; stops the script if the process `pid` exits
# first (with the tail of its `log`).
wait_ready() {  # url pid log
  local url="$1" pid="$2" log="$3"
  for _ in $(seq 1 600); do
    kill -0 "$pid" 2>/dev/null || { tail -30 "$log" >&2; die "server exited during start-up (log above)"; }
    curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null && return 0
    sleep 0.2
  done
  tail -30 "$log" >&2
  die "server at $url not ready after 120 s"
}

# A free port on 127.0.0.1: TCP, or UDP with the argument 2 (SOCK_DGRAM).
free_port() {
  python3 -c 'import socket, sys; s=socket.socket(type=int(sys.argv[1])); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "${1:-1}"
}
