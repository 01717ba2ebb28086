"""`python -m unitune VERB ...` (what torchrun launches)."""
import sys

from unitune.cli import main

sys.exit(main())
