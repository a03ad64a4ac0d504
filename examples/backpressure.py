"""Backpressure: a slow consumer pauses generation instead of growing memory.

The producer thread puts tokens into a queue of `buffer_size` slots; when it is full,
generation waits until the consumer catches up.

    python examples/backpressure.py [MODEL]
"""

import asyncio
import sys

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    model = await AsyncModel.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
    config = StreamConfig(max_tokens=60, temperature=0.7, buffer_size=8)
    stream = model.generate_stream("Generate text:", config=config)
    async for token in stream:
        print(token.text, end="", flush=True)
        await asyncio.sleep(0.05)  # slow consumer: the generator pauses automatically
    print(f"\n[at most {stream.max_queued} tokens were ever waiting in the buffer of 8]")


asyncio.run(main())
