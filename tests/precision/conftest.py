"""The tiny sd1x project and config builder of the training tests, shared here."""

from tests.training.conftest import project  # noqa: F401
