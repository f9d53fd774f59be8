"""`python -m service.cli ...` runs the command line."""

from service.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
