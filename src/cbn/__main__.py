"""``python -m cbn``: the same command line as the ``cbn`` console script."""

from cbn.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
