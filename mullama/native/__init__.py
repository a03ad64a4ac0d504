"""The native layer: loading libllama and its generated bindings, devices, the compute lock, and the
small classes that own C objects and free them exactly once. Imports nothing else of mullama but
the errors and the cache paths."""
