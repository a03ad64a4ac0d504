"""The ``mullama`` command (placeholder: grows into the full CLI)."""
import sys
def main(argv=None) -> int:
    return 0
