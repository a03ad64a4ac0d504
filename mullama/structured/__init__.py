"""Structured output: JSON Schema to GBNF, the GBNF checks and limits, and the chat answer's JSON format.
Pure Python over the errors: no model, no library."""
