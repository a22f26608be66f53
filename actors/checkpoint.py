"""Where checkpoints live and how one becomes complete.

    <output_dir>/checkpoints/step_000003/   3 steps done (0, 1, 2): a resume starts at step 3
        learner/          DeepSpeed checkpoint (every rank writes its shard; tag "ds")
        hf_meta/          the model's config, tokenizer and generation config (for the export)
        judge_cache.sqlite  a consistent copy of the run's judge cache
        in_flight.pkl     a generated step not yet trained (max_staleness 1; a stop mid-judging)
        state.json        the coordinator: step, data cursor, RNG states, weight version, ...

A checkpoint is written under step_000003.partial and renamed when everything is in it: a
directory without the suffix is complete (rename is atomic on one filesystem), and a crash
mid-write leaves only a .partial folder that nothing reads and the next save replaces.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path

from conf.errors import ConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.json"
CACHE_FILE = "judge_cache.sqlite"
IN_FLIGHT_FILE = "in_flight.pkl"
RUN_ID_FILE = "run_id"
_NAME = re.compile(r"^step_(\d{6,})$")


def step_dir(output_dir: str | Path, steps_done: int) -> Path:
    return Path(output_dir) / CHECKPOINTS / f"step_{steps_done:06d}"


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return bool(_NAME.match(path.name)) and (path / STATE_FILE).is_file()


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def steps_done(path: str | Path) -> int:
    match = _NAME.match(Path(path).name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint folder (step_NNNNNN)")
    return int(match.group(1))


def begin(output_dir: str | Path, steps: int) -> Path:
    """A fresh .partial folder to write checkpoint `steps` into."""
    partial = step_dir(output_dir, steps).with_name(step_dir(output_dir, steps).name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path) -> Path:
    """Publish a fully written .partial folder under its final name (replacing an older one)."""
    final = partial.with_name(partial.name.removesuffix(".partial"))
    if final.exists():  # the same step saved again (a resumed run re-reached it)
        stale = final.with_name(final.name + ".stale")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        shutil.rmtree(stale)
    partial.rename(final)
    return final


def due(cfg, steps_done: int) -> bool:
    """trainer.save_every: a checkpoint after every k-th step (0: only at the end and on a stop)."""
    every = cfg.trainer.save_every
    return bool(every and steps_done % every == 0)


def judge_cache_file(judge, output_dir: str | Path, *, evaluation: bool = False) -> Path | None:
    """Where a judge's cache lives: judge.cache_path, else a file in the output folder (the
    evaluation judge's own); None when judge.cache is off."""
    if not judge.cache:
        return None
    return Path(judge.cache_path or Path(output_dir) / (f"eval_{CACHE_FILE}" if evaluation else CACHE_FILE))


def prune(output_dir: str | Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0 = keep all)."""
    if keep <= 0:
        return
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def write_state(folder: Path, state: dict) -> None:
    """The coordinator's part; written last, so its presence marks a fully written folder."""
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, folder / STATE_FILE)


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint a run continues from (trainer.resume), or None for a fresh start.
    Refuses, before anything starts, what would mix two runs in one output folder."""
    output_dir = Path(output_dir)
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if resume == "never":
        if latest_checkpoint(output_dir) is not None or (output_dir / "metrics.jsonl").exists():
            raise ConfigError(f"trainer.resume=never but {output_dir} holds a run (metrics.jsonl or checkpoints); "
                              "continue it with trainer.resume=auto or choose another trainer.output_dir")
        return None
    path = Path(resume)
    if not is_complete(path):
        raise ConfigError(f"trainer.resume={resume!r}: not a complete checkpoint folder (step_NNNNNN with "
                          f"{STATE_FILE}); use auto, never, or a folder under <output_dir>/{CHECKPOINTS}/")
    return path


def rewind_outputs(output_dir: str | Path, steps: int) -> list[str]:
    """Make the run's logs end where the checkpoint does: metrics.jsonl and validation.jsonl keep
    steps < `steps`, rollouts and validation stories of later steps are removed (the resumed run writes them again). Returns what changed."""
    output_dir, changed = Path(output_dir), []
    for name in ("metrics.jsonl", "validation.jsonl"):
        log = output_dir / name
        if not log.exists():
            continue
        lines = log.read_text().splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] < steps]
        if len(kept) != len(lines):
            tmp = log.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, log)
            changed.append(f"{name}: {len(lines) - len(kept)} row(s) after step {steps - 1} dropped")
    for folder in ("rollouts", "validation"):
        for path in sorted((output_dir / folder).glob("step_*.jsonl")):
            if int(path.stem.split("_")[1]) >= steps:
                path.unlink()
                changed.append(f"{folder}/{path.name} removed")
    return changed


def output_folder(cfg) -> Path:
    """trainer.output_dir, with a warning where `ray job submit` would put a relative one out of
    a later job's reach."""
    output_dir = Path(cfg.trainer.output_dir)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ and not output_dir.is_absolute():
        print(f"warning: trainer.output_dir={output_dir} is relative: under `ray job submit` it lands in Ray's "
              "copy of the working dir, where a later job cannot resume from it; give an absolute path")
    return output_dir


def run_name(output_dir: str | Path, resume_from: Path | None) -> str:
    """The name a run's actors carry on the cluster: the output folder's basename and an id made at
    the folder's first start, kept in <output_dir>/run_id and in every checkpoint (a folder that
    lost the file gets it back from its own checkpoint). Two folders of one basename (a/run, b/run)
    get different names; a second run into one folder, and a resume, get the same one, so Ray
    refuses the first and the second waits for its predecessor's actors to be released."""
    output_dir = Path(output_dir)
    path = output_dir / RUN_ID_FILE
    if not path.exists():
        own = resume_from is not None and Path(resume_from).resolve().parent == (output_dir / CHECKPOINTS).resolve()
        path.write_text((own and read_state(resume_from).get("run_id") or secrets.token_hex(4)) + "\n")
    return f"{output_dir.resolve().name}-{run_id(output_dir)}"


def run_id(output_dir: str | Path) -> str:
    return (Path(output_dir) / RUN_ID_FILE).read_text().strip()


def run_identity(cfg) -> dict:
    """The config keys a checkpoint is bound to: another model or learner layout cannot load it."""
    return {"model.path": cfg.model.path, "learner.world_size": cfg.learner.world_size,
            "learner.zero_stage": cfg.learner.zero_stage}


def prepare_resume(cfg, output_dir: Path) -> tuple[Path | None, dict | None]:
    """Before anything starts: the checkpoint to continue from (trainer.resume) and its state,
    refused if it belongs to a different model or learner layout; the run's logs rewound to it
    and its judge cache restored if the run's own is gone."""
    folder = resolve_resume(cfg.trainer.resume, output_dir)
    if folder is None:
        return None, None
    state = read_state(folder)
    for key, value in run_identity(cfg).items():
        if state["run"][key] != value:
            raise ConfigError(f"config key '{key}': {value!r} differs from the checkpoint's {state['run'][key]!r} "
                              f"({folder}); resume with the same value or start a new trainer.output_dir")
    for line in rewind_outputs(output_dir, state["steps_done"]):
        print(f"resume: {line}")
    cache = judge_cache_file(cfg.judge, output_dir)
    if cache is not None and not cache.exists() and (folder / CACHE_FILE).exists():
        shutil.copyfile(folder / CACHE_FILE, cache)
        print(f"resume: judge cache restored from {folder / CACHE_FILE}")
    print(f"resume: from {folder} (step {state['steps_done']}, weight version {state['weight_version']})")
    return folder, state
