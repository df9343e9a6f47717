import sys

from sftrun.cli import main

sys.exit(main())
