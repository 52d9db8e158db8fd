"""``python -m personagate``: the same as the ``personagate`` command."""

import sys

from personagate.cli import main

sys.exit(main())
