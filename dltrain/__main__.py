"""`python -m dltrain` is the same as `dltrain`."""

from dltrain.cli import main

if __name__ == "__main__":
    main()
