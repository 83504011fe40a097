import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

#: A configuration that trains in well under a second, for API and contract tests.
FAST = {"epochs": 3, "hidden_dims": [16], "latent_dim": 2, "n_importance_samples": 8}


@pytest.fixture
def fast_params() -> dict:
    return dict(FAST)
