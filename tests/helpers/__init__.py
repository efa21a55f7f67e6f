"""The tests' shared helpers, imported as `from helpers.X import ...` from any test folder
(pyproject.toml puts tests/ on sys.path): helpers.training trains tiny runs in-process,
helpers.cli runs the command line as a user does. Fixtures are in tests/conftest.py."""
