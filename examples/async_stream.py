"""Async streaming: tokens arrive through a bounded buffer without blocking the event loop.

    python examples/async_stream.py [MODEL]
"""

import asyncio
import sys

from mullama import AsyncModel, StreamConfig


async def main() -> None:
    model = await AsyncModel.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
    config = StreamConfig(max_tokens=200, temperature=0.7)
    stream = model.generate_stream("Tell me about Rust:", config=config)
    token_count = 0
    async for token in stream:
        print(token.text, end="", flush=True)
        token_count += 1
    print(f"\nGenerated {token_count} tokens")
    print(f"Tokens/sec: {stream.tokens_per_second():.1f}")


asyncio.run(main())
