"""Shared, expensive things: one tiny model and one Ray cluster for the whole session."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_path():
    """The default tiny model (built once into the shared cache, as `python launch.py` does)."""
    from learner.tiny_model import build_tiny_model

    return str(build_tiny_model(show_progress=False))


@pytest.fixture(scope="session")
def tiny35_model_path():
    """The Qwen3.5-architecture tiny model (conf=tiny35), built once like the default one."""
    from learner.tiny_model import build_tiny_model

    return str(build_tiny_model(architecture="qwen3_5", show_progress=False))


@pytest.fixture(scope="session")
def quick_run():
    """conf=tiny overrides for end-to-end runs whose assertions depend on neither story length nor
    a step's size: 2 prompts a step and stories of at most 64 tokens take a step from ~10 s to ~2 s
    on 2 cores (a launch's ~35 s of actor start-up stays). stories: the policy stories of a step.
    one_engine_args: the same with one engine and one reward worker, for runs whose assertions do
    not depend on how many there are (each one fewer is a process less to start)."""
    from types import SimpleNamespace

    args = ["data.prompts_per_step=2", "rollout.sampling.max_new_tokens=64", "rollout.val_sampling.max_new_tokens=64"]
    return SimpleNamespace(args=args, one_engine_args=[*args, "rollout.num_engines=1", "judge.num_workers=1"],
                           stories=2 * 6)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory):
    """One local Ray cluster on loopback; launch.py subprocesses join it through RAY_ADDRESS."""
    import ray

    from cluster.connect import WORKER_NICENESS

    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             _system_config={"worker_niceness": WORKER_NICENESS},  # as launch.py's own cluster
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
                                       "TOKENIZERS_PARALLELISM": "false"}})
    address = ray.get_runtime_context().gcs_address
    yield address
    ray.shutdown()


# ---------------------------------------------------------------- POLARIS dataset files
#
# Written by the suite itself, in the two shapes the loader reads (actors/data.py):
# - the original training files: `prompt` is a list of chat messages, no uid, the target only in
#   the text ("... approximately N words long."), with `story` and `ground_truth_reasoning`;
# - the prompt release: `uid` (a string or an integer), `prompt` a string, `target_word_count`,
#   and optionally the reference fields.

TRAINING_PROMPTS = [  # (request, target words, story, reasoning); the files repeat them verbatim
    ("Write a short story about a ferry pilot who finds a stowaway cat on the last crossing.", 800,
     "Ilse had piloted the Aurelia across the strait for eleven winters, and she knew every groan of its hull. "
     "So when something mewed behind the life jackets, she knew it was not the ship.\n\n"
     "The cat was grey, salt-stiff and entirely unimpressed by her.",
     "Open on routine, break it with a small mystery, let the cat stand for what Ilse has been avoiding."),
    ("Write a short story about an old clockmaker teaching his granddaughter to listen.", 900,
     "Every clock in Anselm's shop ticked a little differently, and he could name each one with his eyes shut. "
     "Nell thought this was a trick until he blindfolded her and asked which clock was lying.\n\n"
     "It took her a week to hear it.",
     "A quiet apprenticeship story; the lesson is attention, the ending a role reversal."),
]
VALIDATION_PROMPT = ("Write a short story about a night guard who notices a statue moving one step each evening.",
                     700, "On Monday the bronze runner had one foot raised. By Friday she was off her plinth.",
                     "Slow escalation over five nights, resolved with wonder rather than fear.")


def _training_row(request, target, story, reasoning):
    text = f"{request} Your story should be approximately {target} words long."
    return {"prompt": [{"content": text, "role": "user"}], "story": story, "ground_truth_reasoning": reasoning}


def _release_row(uid, request, target, story, reasoning):
    return {"uid": uid, "prompt": f"{request} The story should be approximately {target:,} words long.",
            "target_word_count": target, "story": story, "ground_truth_reasoning": reasoning}


def _write(rows, path):
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def polaris_files(tmp_path_factory):
    """Paths of POLARIS-shaped dataset files in a temporary folder:
    training_parquet / training_jsonl: the original training shape, 8 rows (2 prompts x 4, targets
    800, 900, ...); validation_parquet: the same shape, 2 rows (700 words); release_parquet /
    release_jsonl: the release shape, 3 rows (the two training prompts, then the validation one);
    the parquet file's uids are the integers 0, 1, 2, the jsonl file's "r0", 1 and "r2"."""
    from types import SimpleNamespace

    folder = tmp_path_factory.mktemp("polaris_files")
    training = [_training_row(*TRAINING_PROMPTS[i % 2]) for i in range(8)]
    validation = [_training_row(*VALIDATION_PROMPT)] * 2
    prompts = [*TRAINING_PROMPTS, VALIDATION_PROMPT]
    return SimpleNamespace(
        training_parquet=_write(training, folder / "train.parquet"),
        training_jsonl=_write(training, folder / "train.jsonl"),
        validation_parquet=_write(validation, folder / "val.parquet"),
        release_parquet=_write([_release_row(i, *p) for i, p in enumerate(prompts)], folder / "release.parquet"),
        release_jsonl=_write([_release_row(u, *p) for u, p in zip(["r0", 1, "r2"], prompts)], folder / "release.jsonl"),
    )
