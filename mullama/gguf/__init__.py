"""GGUF files: a pure reader of the header (metadata, tensors) and the preflight checks that refuse a
file on which llama.cpp would abort the process."""
