# Starts a ClickHouse server of the test run's own: loopback only, free ports, its own data,
# tmp and log directories. Sourced by scripts/test after services.sh; defines start_clickhouse.

# start_clickhouse DIR: writes DIR/config.xml and DIR/users.xml, starts the server, waits for
# /ping, and sets CLICKHOUSE_PID and CLICKHOUSE_URL. With MCP_METER_TEST_ZOOKEEPER (host:port)
# the server keeps its replicated tables' metadata there, under a root node of its own, so
# that servers sharing the ZooKeeper never see each other's tables.
start_clickhouse() {
  local dir=$1
  mkdir -p "$dir/data" "$dir/tmp" "$dir/log" "$dir/user_files" "$dir/format_schemas"
  local http_port tcp_port interserver_port zookeeper=""
  http_port=$(free_port)
  tcp_port=$(free_port)
  interserver_port=$(free_port)
  if [ -n "${MCP_METER_TEST_ZOOKEEPER:-}" ]; then
    local root
    root="/mcp-meter-test/$(basename "$dir")-$(python3 -c 'import uuid; print(uuid.uuid4().hex)')"
    printf 'create /mcp-meter-test ""\ncreate %s ""\n' "$root" |
      /usr/share/zookeeper/bin/zkCli.sh -server "$MCP_METER_TEST_ZOOKEEPER" > "$dir/log/zkcli.log" 2>&1
    grep -q "Created $root" "$dir/log/zkcli.log" ||
      { echo "could not create $root in ZooKeeper:" >&2; tail -n 20 "$dir/log/zkcli.log" >&2; return 1; }
    zookeeper="<zookeeper>
        <node><host>${MCP_METER_TEST_ZOOKEEPER%:*}</host><port>${MCP_METER_TEST_ZOOKEEPER##*:}</port></node>
        <root>$root</root>
    </zookeeper>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>$interserver_port</interserver_http_port>
    <macros><replica>replica-1</replica></macros>"
  fi
  cat > "$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http_port</http_port>
    <tcp_port>$tcp_port</tcp_port>
    <max_connections>512</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
    $zookeeper
</yandex>
XML
  cat > "$dir/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas><default></default></quotas>
</yandex>
XML
  clickhouse-server --config-file="$dir/config.xml" > "$dir/log/stdout.log" 2>&1 &
  CLICKHOUSE_PID=$!
  CLICKHOUSE_URL="http://127.0.0.1:$http_port"
  wait_ready clickhouse-server "$CLICKHOUSE_PID" "$dir/log/clickhouse-server.err.log" \
    curl -sf "$CLICKHOUSE_URL/ping"
}
