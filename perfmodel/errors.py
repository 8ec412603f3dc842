"""One exception type for every user-facing input problem; the CLI turns it into one line and exit code 2."""


class PerfmodelError(ValueError):
    """Bad user input: the message names the field and what is allowed."""


def bad_value(field: str, value: object, allowed: object) -> PerfmodelError:
    return PerfmodelError(f"{field}: {value!r} is not valid; allowed: {allowed}")
