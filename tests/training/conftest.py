from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mnist_dir(data_dir: Path) -> Path:
    """The MNIST IDX files (``../shared/data/mnist``); tests that need them skip without them."""
    path = data_dir / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"MNIST not found in {path} (set FPN_DATA_DIR)")
    return path
