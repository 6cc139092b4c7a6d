import sys

from aimonk.cli import main

sys.exit(main())
