"""A FastMCP 4.x server nobody at mcp-meter wrote the framework of, for the proxy's tests.

usage: fastmcp_server.py stdio | fastmcp_server.py http PORT [--stateless]

Each finished run of a tool appends its name to the file $PEER_RUNS (if set), so a test can
compare what ran with what was metered.
"""

import os
import sys

import anyio
import mcp_types
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError

server = FastMCP("peer-tools")


def ran(tool: str) -> None:
    path = os.environ.get("PEER_RUNS")
    if path:
        with open(path, "a") as runs:
            runs.write(tool + "\n")


@server.tool
def add(a: int, b: int) -> int:
    """Adds two integers."""
    ran("add")
    return a + b


@server.tool
def fail(reason: str = "no") -> str:
    """Always fails, as a tool error."""
    ran("fail")
    raise ToolError(reason)


@server.tool
async def ask(ctx: Context) -> str | mcp_types.InputRequiredResult:
    """Asks the user's name: an input_required round at 2026-07-28, an elicitation before."""
    if ctx._is_modern_protocol():
        answers = ctx.input_responses
        if not answers:
            return mcp_types.InputRequiredResult(
                input_requests={
                    "user": mcp_types.ElicitRequest(
                        params=mcp_types.ElicitRequestFormParams(
                            message="Your name?",
                            requested_schema={
                                "type": "object",
                                "properties": {"name": {"type": "string"}},
                                "required": ["name"],
                            },
                        )
                    )
                },
                request_state="asked",
            )
        answer = answers["user"]
        content = getattr(answer, "content", None) or answer["content"]
        ran("ask")
        return f"hello {content['name']}"
    answer = await ctx.elicit("Your name?", response_type=str)
    ran("ask")
    return f"hello {answer.data}"


@server.tool
async def slow(seconds: float) -> str:
    """Sleeps, then answers."""
    await anyio.sleep(seconds)
    ran("slow")
    return f"slept {seconds}"


@server.tool
def environment() -> list[str]:
    """The names of the server's environment variables that mention mcp-meter, and any value
    that looks like the meter key the test uses."""
    ran("environment")
    return sorted(
        name
        for name, value in os.environ.items()
        if "MCP_METER" in name or "test-key" in value
    )


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run(transport="stdio", show_banner=False)
    else:
        server.run(
            transport="http",
            host="127.0.0.1",
            port=int(sys.argv[2]),
            stateless_http="--stateless" in sys.argv,
            show_banner=False,
            log_level="warning",
        )
