"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class RsqError(Exception):
    """A problem with the user's input (flag, path, file), not a bug in rsq."""


def choices_error(what: str, value, allowed) -> RsqError:
    """The standard message for a value outside a fixed set of choices."""
    allowed_text = ", ".join(str(a) for a in allowed)
    return RsqError(f"unknown {what} {value!r}; choose from: {allowed_text}")
