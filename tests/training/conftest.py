"""accelerate keeps one process-wide state; each in-process run here must start from a clean one."""

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
