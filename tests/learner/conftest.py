"""In-process one-rank learners for the learner tests. They share one gloo group for the whole
session: DeepSpeed caches the first group it sees (its world-group clone), so a group destroyed
and made again breaks every later engine. The environment LearnerWorker sets is undone per module."""
import os
import sys

import pytest
import torch

from cluster.netutil import free_port
from learner.settings import LearnerSettings
from learner.worker import LearnerWorker


def _settings(model_path: str = "unused", **overrides) -> LearnerSettings:
    base = {"model_path": model_path, "dtype": "float32", "device": "cpu", "zero_stage": 1, "lr": 1e-3,
            "weight_decay": 0.0, "betas": (0.9, 0.999), "grad_clip": 1.0, "micro_batch_size": 2,
            "gradient_checkpointing": False, "clip_low": 0.2, "clip_high": 0.28, "temperature": 0.8,
            "pad_token_id": 0, "seed": 0}
    return LearnerSettings(**{**base, **overrides})


@pytest.fixture(scope="session")
def learner_settings():
    """settings(model_path="unused", **overrides) -> LearnerSettings for a small CPU learner."""
    return _settings


@pytest.fixture(scope="session")
def _group_port():
    yield free_port()  # the first worker creates the group on it; later ones join it as rank 0 of 1
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def build_worker(tiny_model_path, _group_port):
    """build_worker(**overrides) -> a LearnerWorker of the tiny model (or of overrides' model_path)."""
    saved_env = dict(os.environ)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed builds a C++ op on CPU; the venv's ninja (as the Ray roles use) keeps its build cached
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])
    yield lambda **overrides: LearnerWorker(_settings(**{"model_path": tiny_model_path, **overrides}), 0, 1,
                                            "127.0.0.1", _group_port)
    os.environ.clear()
    os.environ.update(saved_env)
