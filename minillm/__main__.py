"""`python -m minillm doctor` checks that everything the course needs is installed and working."""

import argparse
import sys

from minillm import doctor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__)
    parser.add_argument("command", choices=["doctor"], help="doctor: one [OK]/[FAIL] line per component")
    parser.parse_args(argv)
    return doctor.main()


if __name__ == "__main__":
    sys.exit(main())
