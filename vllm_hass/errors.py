"""One exception type for bad user input.

Raised with a single line that names the file or field and the expected value.
The CLI prints it without a traceback (exit 2); inside vLLM it surfaces as a
ValueError before the engine starts.
"""


class UserError(ValueError):
    pass
