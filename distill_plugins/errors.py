"""One error type for bad user input: a one-line message, a non-zero exit, no traceback."""


class DistillError(SystemExit):
    """Raised for invalid input or configuration.

    It subclasses ``SystemExit`` so that fairseq's CLIs (which we do not own) end with exit code 1
    and print only the message, never a traceback. Library callers can still ``except DistillError``.
    """

    def __init__(self, message: str):
        self.message = " ".join(message.split())  # always one line, whatever a wrapped error said
        super().__init__(f"fairseq-distill: error: {self.message}")

    def __str__(self):
        return self.args[0]


def brief(exc: BaseException) -> str:
    """``Type: first sentence`` of an exception, to quote inside a one-line message."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text.split('. ')[0].rstrip('.')}" if text else type(exc).__name__


def not_utf8(what: str) -> "DistillError":
    """The one-line error for a text input (``what``: the flag and path, say) that does not decode as UTF-8."""
    return DistillError(f"{what} is not UTF-8 text; pass a UTF-8 text file (convert one in another encoding "
                        "with iconv -t utf-8)")


def check(condition: bool, message: str):
    if not condition:
        raise DistillError(message)
