"""Checkpoint folders: only complete ones count, resume rewinds the logs to them, and a resume that
would mix two runs is refused before anything starts."""
import json

import pytest

from actors import checkpoint
from conf import ConfigError, load_config


def write_checkpoint(out, steps, **state):
    partial = checkpoint.begin(out, steps)
    (partial / "learner").mkdir()
    checkpoint.write_state(partial, {"steps_done": steps, "weight_version": steps, "run": checkpoint.run_identity(
        load_config(["model.path=tiny", "learner.world_size=1", "learner.zero_stage=1"])), **state})
    return checkpoint.commit(partial)


def test_a_half_written_checkpoint_is_never_taken_as_complete(tmp_path):
    write_checkpoint(tmp_path, 3)
    partial = checkpoint.begin(tmp_path, 6)
    (partial / "learner").mkdir()  # the writer died before state.json and the rename
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.step_dir(tmp_path, 3)
    no_state = checkpoint.step_dir(tmp_path, 9)
    no_state.mkdir()
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.step_dir(tmp_path, 3)
    write_checkpoint(tmp_path, 6)  # the next save of that step replaces the leftover
    assert checkpoint.latest_checkpoint(tmp_path) == checkpoint.step_dir(tmp_path, 6)
    assert not checkpoint.step_dir(tmp_path, 6).with_name("step_000006.partial").exists()


def test_saving_a_step_again_replaces_it_and_prune_keeps_the_newest(tmp_path):
    for steps in (2, 4, 6):
        write_checkpoint(tmp_path, steps)
    write_checkpoint(tmp_path, 4, marker="second")
    assert checkpoint.read_state(checkpoint.step_dir(tmp_path, 4))["marker"] == "second"
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_000004", "step_000006"]
    checkpoint.prune(tmp_path, keep=0)  # 0 keeps all
    assert len(checkpoint.complete_checkpoints(tmp_path)) == 2


def test_rewinding_drops_the_steps_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(5)))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 3)))
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "validation").mkdir()
    for s in range(5):
        (tmp_path / "rollouts" / f"step_{s:06d}.jsonl").write_text("{}\n")
    for s in (1, 3):
        (tmp_path / "validation" / f"step_{s:06d}.jsonl").write_text("{}\n")
    changed = checkpoint.rewind_outputs(tmp_path, 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
    assert [json.loads(line)["step"] for line in (tmp_path / "validation.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == [f"step_{s:06d}.jsonl" for s in range(3)]
    assert [p.name for p in (tmp_path / "validation").iterdir()] == ["step_000001.jsonl"]
    assert len(changed) == 5
    assert checkpoint.rewind_outputs(tmp_path, 3) == []  # nothing more to drop


def test_resume_settings(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None  # a fresh folder: a fresh run
    assert checkpoint.resolve_resume("never", tmp_path) is None
    write_checkpoint(tmp_path, 3)
    assert checkpoint.resolve_resume("auto", tmp_path) == checkpoint.step_dir(tmp_path, 3)
    with pytest.raises(ConfigError, match="trainer.resume=never.*holds a run"):
        checkpoint.resolve_resume("never", tmp_path)
    assert checkpoint.resolve_resume(str(checkpoint.step_dir(tmp_path, 3)), tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(tmp_path / "nope"), tmp_path)


@pytest.mark.parametrize("override, key", [("learner.zero_stage=2", "learner.zero_stage"),
                                           ("model.path=other", "model.path")])
def test_a_checkpoint_of_another_model_or_learner_layout_is_refused(tmp_path, override, key):
    write_checkpoint(tmp_path, 3)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3}) + "\n")
    cfg = load_config([f"trainer.output_dir={tmp_path}", override])
    with pytest.raises(ConfigError, match=key):
        checkpoint.prepare_resume(cfg, tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text()  # refused before anything was rewound


def test_the_judge_cache_comes_back_from_the_checkpoint_when_the_runs_own_is_gone(tmp_path, capsys):
    folder = write_checkpoint(tmp_path, 3)
    (folder / checkpoint.CACHE_FILE).write_bytes(b"sqlite bytes")
    cfg = load_config([f"trainer.output_dir={tmp_path}"])
    assert checkpoint.prepare_resume(cfg, tmp_path)[0] == folder
    assert (tmp_path / checkpoint.CACHE_FILE).read_bytes() == b"sqlite bytes"
    assert "judge cache restored" in capsys.readouterr().out


def test_run_names_are_unique_per_output_folder_and_kept_by_a_resume(tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for folder in (a, b):
        folder.mkdir(parents=True)
    name_a, name_b = checkpoint.run_name(a, None), checkpoint.run_name(b, None)
    assert name_a.startswith("run-") and name_b.startswith("run-") and name_a != name_b  # same basename
    assert checkpoint.run_name(a, None) == name_a  # a second run into a: the same name (Ray refuses it)

    saved = write_checkpoint(a, 2, run_id=checkpoint.run_id(a))
    (a / checkpoint.RUN_ID_FILE).unlink()  # the folder lost its file: its own checkpoint has the id
    assert checkpoint.run_name(a, saved) == name_a

    fresh = tmp_path / "c" / "run"
    fresh.mkdir(parents=True)  # resumed from a's checkpoint into another folder: a name of its own
    assert checkpoint.run_name(fresh, saved) not in (name_a, name_b)
