# Starts a Redis of the test run's own: loopback, a free port, its own directory, no
# persistence. Sourced by scripts/test after services.sh; defines start_redis.

# start_redis DIR: starts the server, waits for PONG, sets REDIS_PID and REDIS_URL.
start_redis() {
  local dir=$1
  mkdir -p "$dir"
  local port
  port=$(free_port)
  redis-server --bind 127.0.0.1 --port "$port" --dir "$dir" --save "" --appendonly no \
    --logfile "$dir/redis.log" --daemonize no > "$dir/stdout.log" 2>&1 &
  REDIS_PID=$!
  REDIS_URL="redis://127.0.0.1:$port"
  wait_ready redis-server "$REDIS_PID" "$dir/redis.log" redis-cli -p "$port" ping
}
