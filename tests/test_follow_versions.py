"""serve.follow.CheckpointVersions (`launch.py serve --follow DIR`) on checkpoints a real in-process Learner writes
(learner.checkpointing, DeepSpeed on a one-process gloo group): the newest version, nothing when nothing is newer,
incomplete `.tmp-` folders ignored, and a checkpoint written while it waits picked up."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch
from test_learner import learner_config, run_learner, samples_file  # noqa: F401 - samples_file is a fixture

from core.config import ConfigError
from learner import checkpointing
from serve.follow import CheckpointVersions, NewVersion

BOUND_S = 120.0  # bounds a wait that should end at once: what the learner takes to write one more checkpoint


def test_checkpoint_versions_follow_what_the_learner_writes(one_rank, samples_file, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="no such folder"):
        CheckpointVersions(tmp_path / "nowhere")
    # 4 steps: generator updates at steps 0 and 2 (versions 1, 2; the EMA from step 2), checkpoints after 3 and 4
    learner, _ = run_learner(learner_config(samples_file, tmp_path, 4))
    root = checkpointing.checkpoint_dir(tmp_path)
    assert [p.name for p in checkpointing.list_checkpoints(root)] == ["step_00000003", "step_00000004"]
    versions = CheckpointVersions(tmp_path, poll_s=0.05)

    newest = versions.next(after=0, timeout_s=BOUND_S)
    assert (newest.version, newest.step) == (2, 4)  # the newest checkpoint's, not the first one newer than 0
    assert newest.published_at == (root / "step_00000004" / "cursor.json").stat().st_mtime
    assert newest.weights.keys() == learner.ema.shadow.keys()
    assert all(torch.equal(newest.weights[k], v) for k, v in learner.ema.shadow.items())  # the EMA generator
    raw = CheckpointVersions(tmp_path, use_ema=False, poll_s=0.05).next(after=0, timeout_s=BOUND_S)
    assert all(torch.equal(raw.weights[k], v) for k, v in learner.models.generator_module.state_dict().items())
    assert versions.next(after=2, timeout_s=0.2) is None  # nothing newer

    # a save that crashed before its rename, every file written (a newer step and version), is never read
    partial = root / ".tmp-step_00000009"
    shutil.copytree(root / "step_00000004", partial)
    os.utime(partial)  # the newest folder, as the save that crashed was the last one (copytree kept step 4's times)
    (partial / checkpointing.CURSOR_FILE).write_text(json.dumps({"step": 9, "version": 9, "prompt_state": None}))
    assert versions.next(after=2, timeout_s=0.2) is None
    assert versions.next(after=0, timeout_s=BOUND_S).version == 2

    # a checkpoint written while a follower waits: step 4 updates the generator (version 3), saved at step 5
    got: list[NewVersion | None] = []
    waiting = threading.Thread(target=lambda: got.append(versions.next(after=2, timeout_s=BOUND_S)))
    waiting.start()
    resumed, result = run_learner(learner_config(samples_file, tmp_path, 5))
    waiting.join(BOUND_S)
    assert result["resumed_from"].endswith("step_00000004") and result["version"] == 3
    assert not waiting.is_alive() and got[0] is not None and (got[0].version, got[0].step) == (3, 5)
    assert all(torch.equal(got[0].weights[k], v) for k, v in resumed.ema.shadow.items())
