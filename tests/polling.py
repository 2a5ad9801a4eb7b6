"""Waiting for a distributed system to reach a state, without sleeping a fixed time."""

import time


def wait_until(predicate, timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)
