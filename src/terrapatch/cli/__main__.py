"""``python -m terrapatch.cli``: the ``terrapatch`` command."""

import sys

from terrapatch.cli import main

sys.exit(main())
