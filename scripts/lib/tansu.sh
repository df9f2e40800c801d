# Starts a tansu broker (Apache Kafka compatible) of the test run's own: loopback, a free port,
# sqlite storage in its own directory. Sourced by scripts/test; defines start_tansu.
# Needs free_port and wait_ready from services.sh.

TANSU_VERSION=0.6.0

# install_tansu: `cargo install` it when missing (about 15 minutes, once per machine).
install_tansu() {
  if ! tansu --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
    echo "installing tansu $TANSU_VERSION (about 15 minutes, once per machine)"
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
  fi
}

# start_tansu DIR: starts a broker storing in DIR/tansu.db, waits until it accepts
# connections, and sets TANSU_PID and TANSU_BROKERS.
start_tansu() {
  local dir=$1
  mkdir -p "$dir"
  local port
  port=$(free_port)
  # sqlite:// takes a path; an absolute one needs the extra slash.
  tansu broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "sqlite:///$dir/tansu.db" > "$dir/tansu.log" 2>&1 &
  TANSU_PID=$!
  TANSU_BROKERS="127.0.0.1:$port"
  wait_ready tansu "$TANSU_PID" "$dir/tansu.log" \
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2).close()"
}
