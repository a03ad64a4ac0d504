"""``python -m mullama`` is the ``mullama`` command."""

import sys

from .cli import main

sys.exit(main())
