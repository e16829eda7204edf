"""Every shipped job file is valid and says in its first lines how to run it."""

from pathlib import Path

import pytest

from ft_ray.cli import main
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_recipes_the_issue_names_exist():
    assert {"tiny-cpu.yaml", "qlora-llama3-8b.yaml", "zero3-full-llama3-8b.yaml",
            "lora-zero2-multinode.yaml", "sweep-tiny.yaml", "sweep-lora-llama3-8b.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_validates_offline(path: Path, capsys):
    assert main(["validate", "--offline", str(path)]) == 0, capsys.readouterr().err
    head = path.read_text().splitlines()[:4]
    assert head[0].startswith("#") and any("ft-ray" in line for line in head)
