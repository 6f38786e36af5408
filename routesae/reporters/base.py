"""The reporter contract (filled in with the trainer)."""


class Reporter:
    name = ""
