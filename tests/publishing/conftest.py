"""The tiny sd1x project and the per-test accelerate reset of the training tests, shared here."""

from tests.training.conftest import project  # noqa: F401
