"""The `dltrain` program: the `dltrain` command and `python -m dltrain` both start here."""


def main() -> None:
    """Catch Ctrl-C from the first moment, then run the command line."""
    from dltrain.system.interrupts import STARTUP

    STARTUP.program = True
    STARTUP.__enter__()  # before the imports below take their second or two
    from dltrain.cli import main as run

    run()


if __name__ == "__main__":
    main()
