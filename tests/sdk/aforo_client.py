"""Drives the real Aforo SDK (PyPI aforo-mcp-metering) against a running mcp-meter.

Usage: aforo_client.py BASE_URL API_KEY CALLS
Wraps a tool handler with the SDK, calls it CALLS times (plus three failing calls), flushes,
ends the session (SESSION_END heartbeat), and prints what the SDK reports as JSON.
"""

import asyncio
import json
import sys

from aforo_mcp_metering import AforoMcpBilling


async def main(base_url: str, api_key: str, calls: int) -> None:
    drops = []
    errors = []
    billing = AforoMcpBilling(
        tenant_id="demo",  # the SDK sends it as X-Tenant-Id; it must match the key's tenant
        product_id="prod_sdk_test",
        api_key=api_key,
        ingestor_url=base_url,
        flush_count=1000,
        flush_interval_sec=3600,
        heartbeat_interval_sec=3600,
        on_drop=lambda events, reason: drops.append([len(events), reason]),
        on_error=lambda e: errors.append(str(e)),
    )

    @billing.wrap_tool_handler
    async def handle_tool(name, arguments, **kwargs):
        if name == "sdk_flaky_tool":
            raise RuntimeError("tool failed")
        return [{"type": "text", "text": f"result for {arguments}"}]

    for i in range(calls):
        await handle_tool("sdk_search", {"q": i}, agent_id="sdk-agent", session_id="sdk-session")
    for _ in range(3):
        try:
            await handle_tool("sdk_flaky_tool", {}, agent_id="sdk-agent", session_id="sdk-session")
        except RuntimeError:
            pass
    await asyncio.sleep(0.2)  # let the session's first heartbeat go out
    await billing.flush()
    await billing.end_session()
    print(json.dumps({"dropped": billing.dropped_count, "drops": drops, "errors": errors}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
