"""LoRA variants users pick from papers (DoRA, rsLoRA, PiSSA), each trained by 2 workers with
DDP and with ZeRO-2, exported as an adapter whose config carries the variant, loaded by plain
PEFT (no ft-ray) with the same outputs as the merged model ft-ray exports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ft_ray.cli import main
from ft_ray.config import load_config
from ft_ray.train.trainer import run_training
from tests.conftest import write_job
from tests.integration.test_train import LOAD_WITHOUT_FT_RAY

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VARIANTS = {"dora": {"use_dora": True}, "rslora": {"use_rslora": True}, "pissa": {"init": "pissa"}}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lora_variant_trains_exports_reloads_in_peft_and_merges(ray_local, tmp_path, variant, strategy):
    config = load_config(write_job(
        tmp_path, run_name=f"{variant}-{strategy}", lora=VARIANTS[variant],
        distributed={"strategy": strategy, "deepspeed": {"stage": 2}},
        train={"max_steps": 2, "checkpoint_every": 2, "eval_every": 2}))
    summary = run_training(config)
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    adapter = Path(summary["adapter_path"])
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert (settings["use_dora"], settings["use_rslora"], settings["init_lora_weights"]) == (
        variant == "dora", variant == "rslora", "pissa" if variant == "pissa" else True)
    assert main(["export", summary["best_checkpoint"], "--out", str(tmp_path / "merged"), "--merge"]) == 0
    out = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_FT_RAY, str(adapter), str(tmp_path / "merged")],
                         capture_output=True, text=True, check=True, cwd=tmp_path)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["max_diff"] < 1e-4  # plain PEFT with the adapter == the merged model
    assert result["adapter_changes_output"] > 1e-3  # and the adapter was trained
