"""Python `websockets` broadcast server (benchmark peer): every text message
"GROUP|..." goes to every other connection that joined GROUP with
ws://HOST:PORT/?room=GROUP. Nothing is stored."""
import asyncio
import sys
from urllib.parse import parse_qs, urlparse

import websockets

rooms = {}


async def handler(ws):
    room = parse_qs(urlparse(ws.request.path).query).get("room", [""])[0]
    members = rooms.setdefault(room, set())
    members.add(ws)
    try:
        async for msg in ws:
            websockets.broadcast([m for m in members if m is not ws], msg)
    finally:
        members.discard(ws)


async def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    async with websockets.serve(handler, "127.0.0.1", port, compression=None, max_queue=None) as server:
        print(f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        await asyncio.Future()


asyncio.run(main())
