import sys

from sovpack.cli import main

sys.exit(main())
