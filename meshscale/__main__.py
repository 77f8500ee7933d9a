"""`python -m meshscale ...` is the `meshscale` command."""

from meshscale.app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
