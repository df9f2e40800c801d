# Starts a ZooKeeper of the test run's own (Debian's `zookeeper` package): loopback, a free
# port, its own data directory. ClickHouse 18.16 keeps the block ids of its replicated tables
# there, which is what drops a batch written twice. Sourced by scripts/test after services.sh;
# defines start_zookeeper.

# start_zookeeper DIR: writes DIR/zoo.cfg, starts the server, waits until it answers, and sets
# ZOOKEEPER_PID and ZOOKEEPER_ADDR (host:port).
start_zookeeper() {
  local dir=$1
  mkdir -p "$dir/data"
  local port
  port=$(free_port)
  cat > "$dir/zoo.cfg" <<CFG
tickTime=2000
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
admin.enableServer=false
maxClientCnxns=0
4lw.commands.whitelist=ruok
CFG
  java -Xmx256m -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zoo.cfg" > "$dir/zookeeper.log" 2>&1 &
  ZOOKEEPER_PID=$!
  ZOOKEEPER_ADDR="127.0.0.1:$port"
  wait_ready zookeeper "$ZOOKEEPER_PID" "$dir/zookeeper.log" \
    python3 -c "
import socket
s = socket.create_connection(('127.0.0.1', $port), 0.5)
s.sendall(b'ruok')
assert s.recv(4) == b'imok'
"
}
