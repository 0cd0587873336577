import signal

import pytest


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test's duration: a runner that starts the tests in the
    background of a shell without job control hands them SIGINT ignored, and then Ctrl-C, simulated or real,
    would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
