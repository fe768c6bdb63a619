import sys

from dmuh.cli import main

sys.exit(main())
