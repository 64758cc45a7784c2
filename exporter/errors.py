"""The one exception type that CLIs turn into a one-line message and exit code 2."""


class InputError(Exception):
    """Bad input from the user: missing/corrupt checkpoint, unknown model or scheme, unwritable output.

    The message is a single line that names the problem and, where there is one, the fix.
    """
