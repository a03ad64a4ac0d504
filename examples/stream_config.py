"""Stream configuration: sampling, stop sequences, buffer size and timeout.

    python examples/stream_config.py [MODEL]
"""

import sys

from mullama import Context, Model, StreamConfig

model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
context = Context(model)
config = StreamConfig(
    max_tokens=500,
    temperature=0.7,
    top_k=40,
    top_p=0.9,
    stop_sequences=["END"],
    buffer_size=64,
    timeout_ms=30000,
)
for token in context.generate_stream("Hello:", config=config):
    print(token.text, end="", flush=True)
print()
