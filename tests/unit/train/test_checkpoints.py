"""Which checkpoint a resume trusts: the manifest written last, checked by size in storage
and by sha256 after download."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from ft_ray.train.checkpoints import (MANIFEST, complete_checkpoints, digest_problem, file_digests,
                                      list_checkpoints, manifest_json, manifest_problem, next_checkpoint_name)

FS = pafs.LocalFileSystem()


def checkpoint(run: Path, name: str, manifest: bool = True) -> Path:
    folder = run / name
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "trainer_state.json").write_text('{"step": 4}')
    if manifest:
        (folder / MANIFEST).write_text(manifest_json(file_digests(folder), step=4, world_size=2))
    return folder


def test_complete_checkpoint_passes_both_checks(tmp_path):
    folder = checkpoint(tmp_path, "checkpoint-000004")
    assert manifest_problem(FS, str(folder)) is None
    assert digest_problem(folder) is None


def test_checkpoint_without_manifest_is_incomplete(tmp_path):
    folder = checkpoint(tmp_path, "checkpoint-000004", manifest=False)
    assert manifest_problem(FS, str(folder)) == "no manifest.json (the upload did not finish)"


def test_missing_and_truncated_files_are_found_from_the_listing(tmp_path):
    folder = checkpoint(tmp_path, "checkpoint-000004")
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"weights")
    assert manifest_problem(FS, str(folder)) == "model/adapter_model.safetensors has 7 bytes, the manifest says 700"
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "trainer_state.json").unlink()
    assert manifest_problem(FS, str(folder)) == "trainer_state.json is missing"


def test_changed_bytes_of_the_same_size_are_found_by_sha256(tmp_path):
    folder = checkpoint(tmp_path, "checkpoint-000004")
    (folder / "model" / "adapter_model.safetensors").write_bytes(b"WEIGHTS" * 100)
    assert manifest_problem(FS, str(folder)) is None  # sizes match: only the digest tells
    assert digest_problem(folder).startswith("model/adapter_model.safetensors has sha256 ")


def test_checkpoints_newest_first_and_incomplete_ones_set_apart(tmp_path):
    checkpoint(tmp_path, "checkpoint-000004")
    checkpoint(tmp_path, "checkpoint-000008", manifest=False)
    checkpoint(tmp_path, "checkpoint-000008-1")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "rejected").mkdir()
    names = [c.name for c in list_checkpoints(FS, str(tmp_path))]
    assert names == ["checkpoint-000008-1", "checkpoint-000008", "checkpoint-000004"]
    complete, skipped = complete_checkpoints(FS, str(tmp_path))
    assert [c.name for c in complete] == ["checkpoint-000008-1", "checkpoint-000004"]
    assert skipped == [("checkpoint-000008", "no manifest.json (the upload did not finish)")]
    assert list_checkpoints(FS, str(tmp_path / "no-such-run")) == []


def test_a_step_reached_again_gets_a_new_folder(tmp_path):
    checkpoint(tmp_path, "checkpoint-000008", manifest=False)
    existing = list_checkpoints(FS, str(tmp_path))
    assert next_checkpoint_name(existing, 4) == "checkpoint-000004"
    assert next_checkpoint_name(existing, 8) == "checkpoint-000008-1"


def test_the_best_checkpoint_is_chosen_from_storage_by_eval_loss():
    from ft_ray.train.checkpoints import Candidate, best_of

    complete = [Candidate.parse(n) for n in ("checkpoint-000008-1", "checkpoint-000008", "checkpoint-000004")]
    assert best_of(complete, {4: 2.0, 8: 1.5}).name == "checkpoint-000008-1"  # the newer attempt at step 8
    assert best_of(complete, {4: 1.0, 8: 1.5}).name == "checkpoint-000004"
    assert best_of(complete, {}).name == "checkpoint-000008-1"  # no evals: the newest
    assert best_of([], {4: 1.0}) is None


@pytest.mark.parametrize("manifest", ["[]", "{}", '{"files": {}}', '{"files": []}', "null", "not json",
                                      '{"files": {"trainer_state.json": {"size": "7", "sha256": "%s"}}}' % ("a" * 64),
                                      '{"files": {"trainer_state.json": {"size": true, "sha256": "%s"}}}' % ("a" * 64),
                                      '{"files": {"trainer_state.json": {"size": 7, "sha256": "xyz"}}}',
                                      '{"files": {"trainer_state.json": 7}}'])
def test_a_malformed_manifest_means_an_incomplete_checkpoint(tmp_path, manifest):
    folder = checkpoint(tmp_path, "checkpoint-000004")
    (folder / MANIFEST).write_text(manifest)
    assert manifest_problem(FS, str(folder)).startswith(f"malformed {MANIFEST}: ")
    assert digest_problem(folder).startswith(f"malformed {MANIFEST}: ")
    complete, skipped = complete_checkpoints(FS, str(tmp_path))
    assert complete == [] and skipped[0][0] == "checkpoint-000004"


def test_a_manifest_must_list_the_state_and_the_weights(tmp_path):
    folder = checkpoint(tmp_path, "checkpoint-000004")
    digests = file_digests(folder)
    for left_out in ("trainer_state.json", "model/adapter_model.safetensors"):
        listed = {name: d for name, d in digests.items() if name != left_out and name != MANIFEST}
        (folder / MANIFEST).write_text(manifest_json(listed, step=4, world_size=2))
        assert "does not list trainer_state.json and the weights" in manifest_problem(FS, str(folder))
    escaping = {**digests, "../other/model.safetensors": digests["trainer_state.json"]}
    (folder / MANIFEST).write_text(manifest_json(escaping, step=4, world_size=2))
    assert "outside the checkpoint" in manifest_problem(FS, str(folder))
