"""Chat text: templates (rendered in a sandbox), tool-call formats and their parser, reasoning blocks.
Text in, text out: nothing here holds a model or a context."""
