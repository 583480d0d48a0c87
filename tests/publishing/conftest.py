"""The tiny sd1x project and the per-test accelerate reset of the training tests, shared here."""

from tests.training.conftest import fresh_accelerator_state, project  # noqa: F401
