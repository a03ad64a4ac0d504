"""Server-sent events with FastAPI: each token is one `data:` event of valid JSON.

    pip install "mullama[examples]"
    python examples/sse_fastapi.py [MODEL]        # serves on 127.0.0.1:3000 (HOST, PORT to change)
    curl -N -X POST http://127.0.0.1:3000/generate -H 'Content-Type: application/json' \\
         -d '{"prompt": "Write a haiku:"}'

The stream runs on an AsyncModel, so the event loop keeps serving other clients, and a
client that disconnects stops its generation.
"""

import json
import os
import sys
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from mullama import AsyncModel, StreamConfig

MODEL = sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m"
models = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    models["default"] = await AsyncModel.load(MODEL)
    yield
    await models.pop("default").aclose()


app = FastAPI(lifespan=lifespan)


class GenerateRequest(BaseModel):
    prompt: str
    max_tokens: int = 500


@app.post("/generate")
async def generate(request: GenerateRequest):
    async def event_stream():
        config = StreamConfig(max_tokens=request.max_tokens)
        async for token in models["default"].generate_stream(request.prompt, config=config):
            yield f"data: {json.dumps({'text': token.text})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(event_stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


if __name__ == "__main__":
    uvicorn.run(app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "3000")))
