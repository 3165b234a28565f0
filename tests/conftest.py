import pytest

# Warning filters live in pyproject.toml ([tool.pytest.ini_options] filterwarnings).


@pytest.fixture(scope="session")
def megatron_world():
    """A single-process Megatron world (TP=PP=1) over gloo, shared by the in-process tests."""
    from tests.helpers import init_megatron

    init_megatron()
    yield
