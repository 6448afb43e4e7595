import sys

from fastppo.cli import main

sys.exit(main())
