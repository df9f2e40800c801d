"""The Aforo SDK's kill signal against a running mcp-meter with a session limit.

Usage: aforo_kill.py BASE_URL API_KEY CALLS
Wraps a tool handler (heartbeats on), calls it CALLS times in session `sdk-limited`, flushes,
and prints JSON: the sessions the SDK's on_session_killed callback reported.
"""

import asyncio
import json
import sys

from aforo_mcp_metering import AforoMcpBilling


async def main(base_url: str, api_key: str, calls: int) -> None:
    killed = []
    billing = AforoMcpBilling(
        tenant_id="demo",
        product_id="prod_limit_test",
        api_key=api_key,
        ingestor_url=base_url,
        flush_count=1000,
        flush_interval_sec=3600,
        heartbeat_interval_sec=3600,
        on_session_killed=lambda session_id, reason: killed.append([session_id, reason]),
    )

    @billing.wrap_tool_handler
    async def handle_tool(name, arguments, **kwargs):
        return [{"type": "text", "text": "ok"}]

    for i in range(calls):
        await handle_tool("sdk_tool", {"i": i}, agent_id="sdk-agent", session_id="sdk-limited")
    await asyncio.sleep(0.2)  # the session's first heartbeat
    await billing.flush()
    print(json.dumps({"killed": killed, "dropped": billing.dropped_count}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
