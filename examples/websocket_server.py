"""WebSocket streaming: send a prompt, receive {"type": "token"} messages, then {"type": "done"}.

    pip install "mullama[examples]"
    python examples/websocket_server.py [MODEL]   # serves on ws://127.0.0.1:8080 (HOST, PORT to change)

Each connection has its own Context (its own conversation cache); all share one Model.
"""

import asyncio
import json
import os
import sys

import websockets

from mullama import AsyncModel


async def main() -> None:
    model = await AsyncModel.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")

    async def handler(websocket):
        async for message in websocket:
            stream = model.generate_stream(message, max_tokens=500)
            async for token in stream:
                await websocket.send(json.dumps({"type": "token", "text": token.text}))
            await websocket.send(json.dumps({"type": "done", "tokens": stream.tokens_generated()}))

    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "8080"))
    async with websockets.serve(handler, host, port):
        print(f"listening on ws://{host}:{port}", flush=True)
        await asyncio.Future()  # serve until interrupted


asyncio.run(main())
