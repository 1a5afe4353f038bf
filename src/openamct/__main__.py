"""`python -m openamct` runs the `openamct` command."""
import sys

from .app.cli import main

sys.exit(main())
