import warnings

import pytest

warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
warnings.filterwarnings("ignore", message=".*Apex is not installed.*")


@pytest.fixture(scope="session")
def megatron_world():
    """A single-process Megatron world (TP=PP=1) over gloo, shared by the in-process tests."""
    from tests.helpers import init_megatron

    init_megatron()
    yield
