import sys

from bsmamba2.cli import main

sys.exit(main())
