import sys

from dmuh.cli import main

if __name__ == "__main__":
    # `torchrun -m dmuh -- encode --run RUN ...`: the "--" stops torchrun from reading --run as an
    # abbreviation of its own --run-path; whether torchrun passes it on depends on Python's argparse.
    argv = sys.argv[1:]
    sys.exit(main(argv[1:] if argv[:1] == ["--"] else argv))
