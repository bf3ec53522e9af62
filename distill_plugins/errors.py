"""One error type for bad user input: a one-line message, a non-zero exit, no traceback."""


class DistillError(SystemExit):
    """Raised for invalid input or configuration.

    It subclasses ``SystemExit`` so that fairseq's CLIs (which we do not own) end with exit code 1
    and print only the message, never a traceback. Library callers can still ``except DistillError``.
    """

    def __init__(self, message: str):
        self.message = message
        super().__init__(f"fairseq-distill: error: {message}")

    def __str__(self):
        return self.args[0]


def check(condition: bool, message: str):
    if not condition:
        raise DistillError(message)
