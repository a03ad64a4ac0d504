"""Early stopping: break out of the loop, or return False from a callback.

Either way decoding stops at once and the context is ready for the next prompt. Greedy decoding
(temperature 0) makes the list the same every run.

    python examples/early_stopping.py [MODEL]
"""

import sys

from mullama import Context, Model

model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
context = Context(model)

# 1. Break out of the loop after 5 list items.
output = ""
token_count = 0
for token in context.generate_stream("Generate a list of fruits:\n-", 1000, temperature=0):
    output += token.text
    token_count += 1
    print(token.text, end="", flush=True)
    if output.count("\n-") >= 5:
        break  # breaking the loop stops generation
print(f"\n[stopped after {token_count} tokens]")

# 2. The same with a callback that returns False.
output = ""


def on_text(text: str) -> bool:
    global output
    output += text
    if output.count("\n-") >= 5:
        return False  # stop generation
    print(text, end="", flush=True)
    return True


stream = context.generate_streaming("Generate a list of fruits:\n-", 1000, on_text, temperature=0)
print(f"\n[stopped after {stream.tokens_generated()} tokens]")
