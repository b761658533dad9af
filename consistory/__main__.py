"""`python -m consistory ...` runs the `consistory` command line."""

import sys

from consistory.cli import main

sys.exit(main())
