"""`python -m consistory.cli`: the same as the `consistory` command."""

import sys

from .main import main

sys.exit(main())
