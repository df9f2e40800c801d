# Helpers for starting the test run's services. Sourced by scripts/test before the services'
# own start scripts.

# free_port: a TCP port nothing listens on now.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_ready NAME PID LOG CHECK...: runs CHECK every 0.1 s until it succeeds; fails, showing the
# end of LOG, if the process PID exits or 30 s pass first.
wait_ready() {
  local name=$1 pid=$2 log=$3
  shift 3
  local waited=0
  until "$@" > /dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited; the end of its log:" >&2
      tail -n 30 "$log" >&2
      return 1
    fi
    if [ "$waited" -ge 300 ]; then
      echo "$name was not ready within 30 s" >&2
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
}
