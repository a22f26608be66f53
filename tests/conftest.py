"""Shared, expensive things: one tiny model and one Ray cluster for the whole session."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_path():
    """The default tiny model (built once into the shared cache, as `python launch.py` does)."""
    from learner.tiny_model import build_tiny_model

    return str(build_tiny_model(show_progress=False))


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray cluster on loopback; launch.py subprocesses join it through RAY_ADDRESS."""
    import ray

    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()
