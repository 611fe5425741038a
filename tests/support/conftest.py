"""The ``reversed_programs`` fixture of tests/support/program_order.py for the tests here."""
from tests.support.program_order import reversed_programs  # noqa: F401
