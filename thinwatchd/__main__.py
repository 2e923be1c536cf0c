import sys

from thinwatchd.cli import main

sys.exit(main())
