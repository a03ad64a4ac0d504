"""Generation: the model, contexts, the per-sequence state machine, samplers, the batching engine,
the async front and the streams. Everything that turns a prompt into tokens."""
