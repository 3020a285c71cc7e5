"""`python -m moekit` is the `moekit` command."""

import sys

from .cli import main

sys.exit(main())
