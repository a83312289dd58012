"""minillm's command line.

    python -m minillm doctor                       one [OK]/[FAIL] line per component the course needs
    python -m minillm exercises --list             every exercise of the course, build or practice
    python -m minillm exercises --check NOTEBOOK   run a learner's notebook and report each exercise's status
    python -m minillm download gpt2                 fetch a real checkpoint into the Hugging Face cache (online)
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
    download = commands.add_parser("download", help="fetch a real checkpoint (chapters' 'On a real model' sections)")
    download.add_argument("name", help="a Hub model id, e.g. gpt2 or HuggingFaceTB/SmolLM2-135M")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from minillm import doctor
        return doctor.main()
    if args.command == "download":
        from minillm import hub
        try:
            print(f"{args.name} is in {hub.download(args.name)}; load it with minillm.hub.load_hf({args.name!r})")
        except (ConnectionError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        return 0
    from minillm.exercises import report
    return report.main(args.list, args.check)


if __name__ == "__main__":
    sys.exit(main())
