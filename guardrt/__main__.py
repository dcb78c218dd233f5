"""`python -m guardrt` is the `guardrt` console script."""

import sys

from guardrt.cli import main

sys.exit(main())
