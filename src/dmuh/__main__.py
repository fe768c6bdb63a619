import sys

from dmuh.cli import main

if __name__ == "__main__":
    sys.exit(main())
