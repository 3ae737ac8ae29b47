"""``python -m jaxseek`` runs the ``jaxseek`` command line."""

import sys

from jaxseek.cli import main

sys.exit(main())
