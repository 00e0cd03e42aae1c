"""Shared test setup: offline Hugging Face, deterministic torch, small thread pools."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.services import postgres_databases  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_OVERRIDES = [
    "model.preset=tiny",
    "data.target_shape=[16, 32, 32]",
    "model.encoder_args={patch: 8, temporal_patch: 4}",
    "model.text_encoder=tiny-random",
    "model.latent_dim=32",
]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def synthetic_source(tmp_path_factory):
    """The session's small synthetic CT-RATE (tests.data_fixtures.shared_synthetic); tests must not modify it."""
    from tests.data_fixtures import shared_synthetic

    return shared_synthetic(tmp_path_factory)


@pytest.fixture
def dataset_copy(synthetic_source, tmp_path):
    """A private copy of ``synthetic_source`` that a test may modify."""
    from tests.data_fixtures import copy_dataset

    return copy_dataset(synthetic_source, tmp_path)


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that make a CPU-sized CT-ViT + tiny BERT model (16 × 32 × 32 volumes)."""
    return list(TINY_OVERRIDES)


@pytest.fixture
def postgres_db():
    """Make fresh PostgreSQL databases on the server .ci/run starts (CTLAB_TEST_POSTGRES_URI); skipped without one.

    MLflow and Optuna each keep an ``alembic_version`` table, so each store needs a database of its own.
    """
    with postgres_databases() as create:
        yield create
