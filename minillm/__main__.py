"""minillm's command line.

    python -m minillm doctor                       one [OK]/[FAIL] line per component the course needs
    python -m minillm exercises --list             every exercise of the course, build or practice
    python -m minillm exercises --check NOTEBOOK   run a learner's notebook and report each exercise's status
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minillm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="one [OK]/[FAIL] line per component")
    exercises = commands.add_parser("exercises", help="list the exercises, or grade notebooks")
    exercises.add_argument("--list", action="store_true", help="print the table of every exercise")
    exercises.add_argument("--check", nargs="+", default=[], metavar="NOTEBOOK", help="run and grade these notebooks")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from minillm import doctor
        return doctor.main()
    from minillm.exercises import report
    return report.main(args.list, args.check)


if __name__ == "__main__":
    sys.exit(main())
