"""The systems under test. Each HTTP one is a context manager that starts its server for a
given number of concurrent streams and yields an `HttpSystem`; a peer that is not on this
machine raises `Absent` with what is missing, and the bench goes on without it."""


class Absent(Exception):
    """This system cannot run here; the message says why and how to get it."""
