"""Error recovery: every failure is a MullamaError with a stable `.code`.

    python examples/error_recovery.py [MODEL]
"""

import sys

from mullama import Context, Model, MullamaError, StreamConfig

model = Model.load(sys.argv[1] if len(sys.argv) > 1 else "smollm2:135m")
context = Context(model)
# A deliberately tight timeout (and no early end), so that this example always shows a STREAM_TIMEOUT.
config = StreamConfig(max_tokens=2000, timeout_ms=500, ignore_eos=True)

try:
    for token in context.generate_stream("Hello:", config=config):
        print(token.text, end="", flush=True)
except MullamaError as error:
    if error.code == "STREAM_TIMEOUT":
        print("\nGeneration timed out", file=sys.stderr)
    elif error.code == "GENERATION_ERROR":
        print(f"\nGeneration failed: {error}", file=sys.stderr)
    else:
        raise

# The context is still usable after an error.
print(context.generate("The capital of France is", max_tokens=8).text)
