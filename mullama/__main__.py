"""``python -m mullama`` is the ``mullama`` command."""

import sys

from ._cli import main

sys.exit(main())
