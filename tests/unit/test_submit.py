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


SECRETS = ["k8s/secrets.yaml", ".env", ".env.production", "deploy/server.pem", "tls.key", ".aws/credentials",
           "application_default_credentials.json"]


def test_credential_files_are_never_uploaded_and_dry_run_says_what_would_be(tmp_path, capsys):
    from ft_ray.cli import main
    from ft_ray.submit import uploaded_files

    job = write_job(tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    for secret in SECRETS:
        (tmp_path / secret).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / secret).write_text("AKIA-not-to-be-sent")
    submission = build_submission(job, [], tune=False, working_dir=tmp_path)
    sent = {str(p) for p in uploaded_files(tmp_path, submission["runtime_env"]["excludes"])}
    assert sent == {"job.yaml", "notes.txt"}

    assert main(["submit", str(job), "--working-dir", str(tmp_path), "--dry-run", "--address", "http://127.0.0.1:9"]) == 0
    out = capsys.readouterr().out
    assert "dry run: nothing submitted" in out and "entrypoint: ft-ray train job.yaml" in out
    size = sum((tmp_path / name).stat().st_size for name in sent)
    assert f"2 files, {size / 2**20:.1f} MiB would be uploaded" in out
    assert "*.pem" in out and "k8s/secrets.yaml" in out


def test_gitignore_keeps_credential_files_out_of_the_repository():
    from ft_ray.submit import SECRET_EXCLUDES

    ignored = set((REPO / ".gitignore").read_text().split())
    assert {pattern.rstrip("/") for pattern in ignored} >= set(SECRET_EXCLUDES)


def test_no_cluster_or_none_answering_is_said_in_one_line(tmp_path, monkeypatch, capsys):
    from ft_ray.cli import main
    from ft_ray.train.trainer import free_port

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    submit = ["submit", str(write_job(tmp_path)), "--working-dir", str(tmp_path)]
    assert main(submit) == 2
    assert capsys.readouterr().err.strip() == ("[ft-ray] error: no cluster to submit to: pass --address "
                                               "http://HEAD:8265 (its Ray dashboard) or set RAY_ADDRESS")
    address = f"http://127.0.0.1:{free_port()}"
    assert main([*submit, "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"[ft-ray] error: cannot reach a Ray dashboard at {address} (") and "Traceback" not in err
