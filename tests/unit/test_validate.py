"""`ft-ray validate`: format, counts and the too-little-data warning."""

import json
import shutil

from ft_ray.cli import main
from tests.conftest import ASSETS, write_job


def test_reports_detected_format_and_counts(tmp_path, capsys):
    assert main(["validate", str(write_job(tmp_path))]) == 0
    out = capsys.readouterr().out.splitlines()
    counts = json.loads(out[1])
    assert counts["train_records"] == 400 and counts["eval_records"] == 48
    assert counts["formats"] == {"instruction": 100}
    assert any(line.startswith("data.train: format auto -> instruction (20 of the first 20 records") for line in out)
    assert not any(line.startswith("warning:") for line in out)
    assert out[-1].startswith("plan: peak ") and "per worker" in out[-1]  # the one-line ft-ray plan


def test_warns_below_100_training_examples_and_lists_bad_lines(tmp_path, capsys):
    data = tmp_path / "small.jsonl"
    shutil.copy(ASSETS / "instruction.jsonl", data)
    with data.open("a") as f:
        f.write("{not json\n")
    job = write_job(tmp_path, data={"train": str(data), "eval": None, "eval_fraction": 0.0})
    assert main(["validate", str(job)]) == 0
    out = capsys.readouterr().out
    assert "warning: only 3 training examples" in out
    assert f"problem: {data}:3: not_json: not JSON" in out


def test_missing_data_file_exits_2(tmp_path, capsys):
    job = write_job(tmp_path, data={"train": str(tmp_path / "nope.jsonl")})
    assert main(["validate", str(job)]) == 2
    assert "data.train: no data files at" in capsys.readouterr().err
