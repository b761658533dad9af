"""`python -m consistory ...` runs the `consistory` command line."""

import sys

from consistory.cli.main import main

sys.exit(main())
