"""`python -m pipelines.cli COMMAND ...` (the same as the `qarm` console script)."""
import sys

from pipelines.cli.dispatch import main

sys.exit(main())
