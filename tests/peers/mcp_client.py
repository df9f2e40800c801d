"""The official MCP Python SDK's client (PyPI `mcp` 2.x), driving a server for the proxy's tests.

usage: mcp_client.py (--url URL | --stdio COMMAND...) [--mode auto|legacy] [--name AGENT]
                     [--clients N] SCENARIO

Prints one JSON line: what each client saw (its protocol version and, per call, the tool,
whether the result was an error, its text and its `_meta`, or the exception it raised).
"""

import argparse
import json
import os
import shlex
import sys

import anyio
import mcp_types as types
from mcp import Client
from mcp.client.stdio import StdioServerParameters


async def elicited(context, params):
    schema = params.model_dump(by_alias=True).get("requestedSchema") or {}
    fields = schema.get("properties") or {"name": {}}
    return types.ElicitResult(action="accept", content={field: "Ada" for field in fields})


async def call(client, seen, tool, arguments, **options):
    try:
        result = await client.call_tool(tool, arguments, **options)
        text = " ".join(getattr(c, "text", "") for c in result.content)
        seen.append({"tool": tool, "isError": bool(result.is_error), "text": text,
                     "meta": result.meta or {}})
    except Exception as error:  # noqa: BLE001 - the test reads what the client raised
        seen.append({"tool": tool, "raised": f"{type(error).__name__}: {error}"})


async def scenario(client, name, seen):
    if name == "usage":
        await client.list_tools()
        for a in range(3):
            await call(client, seen, "add", {"a": a, "b": 1})
        await call(client, seen, "fail", {})
        await call(client, seen, "no_such_tool", {})
    elif name == "repeat":
        for a in range(5):
            await call(client, seen, "add", {"a": a, "b": 1})
    elif name == "ask":
        await call(client, seen, "ask", {})
    elif name == "paid":
        for a in range(4):
            await call(client, seen, "add", {"a": a, "b": 1})
    elif name == "timeout":
        await call(client, seen, "slow", {"seconds": 3}, read_timeout_seconds=1)
        # The server may still finish the call; the client has gone on.
        await anyio.sleep(3)
        await call(client, seen, "add", {"a": 1, "b": 1})
    elif name == "environment":
        await call(client, seen, "environment", {})
    elif name == "everything":
        # server-everything's tools; get-env answers the server's whole environment.
        await client.list_tools()
        await call(client, seen, "echo", {"message": "hello"})
        await call(client, seen, "get-sum", {"a": 2, "b": 3})
        await call(client, seen, "get-env", {})
        await call(client, seen, "no_such_tool", {})
    else:
        raise SystemExit(f"unknown scenario {name}")


async def one(server, args, index, report):
    seen = []
    agent = args.name if args.clients == 1 else f"{args.name}-{index}"
    async with Client(server, mode=args.mode, elicitation_callback=elicited,
                      client_info=types.Implementation(name=agent, version="1.0")) as client:
        await scenario(client, args.scenario, seen)
        report[index] = {"agent": agent, "protocol": client.protocol_version, "calls": seen}


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url")
    parser.add_argument("--stdio")
    parser.add_argument("--mode", default="auto")
    parser.add_argument("--name", default="peer-agent")
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("scenario")
    args = parser.parse_args()
    if args.url:
        server = args.url
    else:
        command = shlex.split(args.stdio)
        # The whole environment, as an MCP client's config passes it (the proxy's key among it).
        server = StdioServerParameters(command=command[0], args=command[1:], env=dict(os.environ))
    report = [None] * args.clients
    async with anyio.create_task_group() as group:
        for index in range(args.clients):
            group.start_soon(one, server, args, index, report)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    anyio.run(main)
    sys.stdout.flush()
