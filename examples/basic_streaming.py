"""Basic streaming: a callback gets each piece of text as it is generated.

    python examples/basic_streaming.py [MODEL]     (MODEL: a .gguf path or a name; default smollm2:135m)
"""

import sys

from mullama import Context, Model

model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
context = Context(model)


def show(text: str) -> bool:
    print(text, end="", flush=True)
    return True  # return False to stop


stream = context.generate_streaming("Write a poem:", 200, show)
print()
print(f"[{stream.tokens_generated()} tokens, {stream.tokens_per_second():.1f} tokens/s]")
