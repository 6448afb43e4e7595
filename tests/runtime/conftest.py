import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models here: one intra-op thread (see tests/conftest.py's one_thread)."""
    yield
