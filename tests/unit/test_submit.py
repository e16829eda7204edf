"""What `ft-ray submit` sends: the entrypoint, a working dir without local bulk, no secrets."""

import pytest

from ft_ray.config import ConfigError, InputError
from ft_ray.submit import build_submission
from tests.conftest import REPO, write_job


def test_entrypoint_and_excludes():
    submission = build_submission(REPO / "configs" / "tiny-cpu.yaml", ["train.max_steps=5"], tune=False,
                                  working_dir=REPO)
    assert submission["entrypoint"] == "ft-ray train configs/tiny-cpu.yaml --set train.max_steps=5"
    env = submission["runtime_env"]
    assert env["working_dir"] == str(REPO)
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert "env_vars" not in env  # the dashboard shows env vars in plain text: no credentials there
    assert "!ft_ray/assets/tiny-llama/model.safetensors" in env["excludes"]


def test_tune_and_pip():
    submission = build_submission(REPO / "configs" / "tiny-cpu.yaml", [], tune=True, working_dir=REPO,
                                  pip=["liger-kernel==0.6.0"])
    assert submission["entrypoint"].startswith("ft-ray tune ")
    assert submission["runtime_env"]["pip"] == ["liger-kernel==0.6.0"]


def test_invalid_config_is_not_submitted(tmp_path):
    with pytest.raises(ConfigError):
        build_submission(write_job(tmp_path, lora={"rnak": 1}), [], tune=False, working_dir=tmp_path)


def test_config_outside_the_working_dir_is_refused(tmp_path):
    with pytest.raises(InputError, match="must be inside the uploaded working dir"):
        build_submission(write_job(tmp_path), [], tune=False, working_dir=REPO)


def test_in_place_working_dir_is_not_uploaded():
    submission = build_submission(REPO / "configs" / "tiny-cpu.yaml", [], tune=False, working_dir=REPO, in_place=True)
    assert submission["runtime_env"] == {"working_dir": f"local://{REPO}"}
