"""The one exception type lmstack raises for bad input.

The CLI prints an `LMStackError` as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class LMStackError(Exception):
    """Bad input: a file, key, shape or option that lmstack cannot use. The message says which and why."""


class UsageError(LMStackError):
    """A malformed command line (a flag without its value, no settings at all): the CLI exits 2, as argparse
    does for its own usage errors."""
