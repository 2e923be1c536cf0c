"""Entry point of ``python -m tests.vm``."""

import sys

from tests.vm.cli import main

sys.exit(main())
