"""Shared fixtures: one local Ray instance per test session, tiny job files, test assets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
DEMO = REPO / "ft_ray" / "assets" / "demo"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")  # quicker reports in short test runs
# After a collective times out (the hung-worker test), Ray Train waits this long for the stuck
# rank's process group to shut down before it restarts the group: 30 s by default, 5 s here.
os.environ.setdefault("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "5")
# A credential that must never appear in a run folder, a log or W&B (set before Ray starts,
# so every worker has it in its environment, as a real key would be).
SECRET_CANARY = "ftray-canary-secret-0123456789"
os.environ["WANDB_API_KEY"] = SECRET_CANARY
# The local S3 server takes any key; set before Ray starts so its workers read S3 the same way.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "ftray-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "ftray-test-secret")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


def tiny_job(tmp_path: Path, **sections) -> dict:
    """A job that trains the built-in model for a few steps on the demo corpus."""
    job = {
        "run_name": "test-run",
        "model": {"name_or_path": "builtin:tiny-llama", "max_seq_len": 128},
        "data": {"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl")},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "distributed": {"num_workers": 2},
        "train": {"learning_rate": 2e-3, "max_steps": 4, "micro_batch_size": 4, "eval_every": 2,
                  "checkpoint_every": 2, "warmup_steps": 1, "log_every": 1},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            job.setdefault(section, {}).update(values)
        else:
            job[section] = values
    return job


def write_job(tmp_path: Path, name: str = "job.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_job(tmp_path, **sections), sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def torch_threads_kept():
    """Puts back torch's thread count after a test that built a model actor's class in the
    pytest process (a scorer sets it to distributed.cpus_per_worker, as in its actor), so the
    tests after it do not run on one thread."""
    import sys

    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    yield
    torch = sys.modules.get("torch")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def linear_kept():
    """Puts back torch.nn.functional.linear after a test that ran a ZeRO-3 engine in the pytest
    process: DeepSpeed replaces it with its own ("This will persist unless manually reset"),
    which saves other tensors for backward (a Ray worker runs one engine; the tests after it
    here measured what the plan counts against it)."""
    import sys

    torch = sys.modules.get("torch")
    linear = torch.nn.functional.linear if torch else None
    yield
    if linear is not None and torch.nn.functional.linear is not linear:
        torch.nn.functional.linear = linear


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 training workers plus room for the data pipeline.
    The dashboard's state API lets Ray Train release the workers of sweep trials that ASHA
    stops (their controllers die with them)."""
    import ray

    if not ray.is_initialized():
        from ft_ray.train.trainer import dashboard_options, free_port

        # its state API asks this cluster, not the Ray a subprocess test started last (trainer.connect_ray)
        ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=True,
                 **dashboard_options(free_port()))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's server mode) in its own process on 127.0.0.1;
    yields its endpoint URL. Tests make their own buckets."""
    import subprocess
    import sys
    import time
    import urllib.request

    from ft_ray.train.trainer import free_port

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError("the local S3 server (moto_server) did not start")
            time.sleep(0.2)
    yield endpoint
    server.terminate()
    server.wait(10)


def piped(tmp_path: Path, *args: str) -> tuple[int, str]:
    """`ft-ray ARGS > out.txt 2>&1` as a user (or CI, or `ray job logs`) would run it, with its
    own local Ray: (exit code, output)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "FT_RAY_VERBOSE")}
    with open(tmp_path / "out.txt", "w") as out:
        code = subprocess.run([sys.executable, "-m", "ft_ray", *args], stdout=out, stderr=subprocess.STDOUT,
                              env=env, cwd=REPO, timeout=900).returncode
    return code, (tmp_path / "out.txt").read_text()


def tiny_reward_model(folder: Path) -> Path:
    """A reward model of the built-in Llama's shape (a sequence classifier with one score, its
    head seeded) and tokenizer in `folder`; the built-in base model beside it in `base/`."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from ft_ray.config import ModelConfig
    from ft_ray.models import save_base_model

    base = save_base_model(ModelConfig(), folder.parent / "base")
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(base, num_labels=1)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


UNTRAINED = [2, 3, 4, 5]  # <|end|> (eos), <|system|>, <|user|>, <|assistant|> in `untrained_llama`


def untrained_llama(folder: Path) -> Path:
    """The built-in Llama with special tokens as Llama 3 and 3.1 base models ship them, never
    trained, saved in `folder`: <|end|> (the eos), <|system|> and <|user|> with all-zero
    embeddings, the eos with an all-zero output row, <|system|> and <|user|> sharing one
    output row, <|assistant|> a trained embedding but an all-zero output row; and a special
    token the chat template never writes, <|reserved_0|> (id 716), with all-zero rows. The pad
    token's embedding is zero in the built-in model too (never trained on, so left as it is)."""
    import torch

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_base_model, load_tokenizer

    model = load_base_model(ModelConfig())
    with torch.no_grad():
        model.get_input_embeddings().weight[[2, 3, 4, 716]] = 0
        head = model.get_output_embeddings().weight
        head[[2, 5, 716]] = 0
        head[[3, 4]] = torch.linspace(-0.01, 0.01, head.shape[1])
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer = load_tokenizer(ModelConfig())
    tokenizer.add_tokens(["<|reserved_0|>"], special_tokens=True)
    tokenizer.save_pretrained(folder)
    return folder


def cross_tokenizer_llama(folder: Path, permuted: bool = True, of: str = "builtin:tiny-llama",
                          shuffled: bool = False) -> Path:
    """A teacher with another tokenizer than the built-in model's, saved in `folder`.
    `permuted`: the built-in Llama (or the model `of`, with its tokenizer) with its tokenizer's
    ordinary tokens numbered in reverse and
    its embedding and output rows moved with them (the same model in other ids: its
    distributions are the built-in model's, relabelled; `shuffled`: its output rows of ordinary
    tokens shuffled first, so it is as sure as the model, of other tokens); else a byte-level BPE of 520 tokens
    trained on the demo's answers alone, its merges across words (fewer tokens there, other special tokens) under a small Llama of
    seeded random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_base_model, load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=of))
    if permuted:
        model = load_base_model(ModelConfig(name_or_path=of))
        tokenizer.save_pretrained(folder)
        raw = json.loads((folder / "tokenizer.json").read_text())
        vocab, special = raw["model"]["vocab"], set(tokenizer.all_special_ids)
        ordinary = sorted(i for i in vocab.values() if i not in special)
        renumbered = dict(zip(ordinary, reversed(ordinary)))
        raw["model"]["vocab"] = {token: renumbered.get(i, i) for token, i in vocab.items()}
        (folder / "tokenizer.json").write_text(json.dumps(raw))
        moved = torch.arange(model.config.vocab_size)
        moved[list(renumbered.values())] = torch.tensor(list(renumbered))  # new row <- old row
        with torch.no_grad():
            if shuffled:
                head, rows = model.get_output_embeddings().weight, torch.tensor(ordinary)
                head[rows] = head[rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]].clone()
            for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
                layer.weight.copy_(layer.weight[moved])
        model.save_pretrained(folder, safe_serialization=True)
        return folder
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)  # merges across words
    bpe.decoder = decoders.ByteLevel()
    answers = [json.loads(line)["output"] for line in (DEMO / "train.jsonl").read_text().splitlines()]
    bpe.train_from_iterator(answers, trainers.BpeTrainer(vocab_size=520, special_tokens=["<pad>", "<s>", "</s>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(folder)
    torch.manual_seed(0)
    config = load_base_model(ModelConfig()).config.to_dict() | {
        "vocab_size": 520, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "num_hidden_layers": 2}
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder, safe_serialization=True)
    return folder


def teacher_llama(folder: Path, wider: bool = False) -> Path:
    """A teacher for distillation, saved in `folder` with the built-in model's tokenizer and 64
    output rows past it (a padded vocabulary, as shipped models have): the built-in Llama with
    its output layer doubled (surer of the same tokens), or (`wider`) a Llama of another shape,
    hidden size 192 in 2 layers, of seeded random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_base_model, load_tokenizer

    model = load_base_model(ModelConfig())
    rows = model.config.vocab_size + 64
    if wider:
        torch.manual_seed(0)
        config = model.config.to_dict() | {"hidden_size": 192, "intermediate_size": 384, "num_hidden_layers": 2,
                                           "head_dim": 48, "vocab_size": rows}
        model = LlamaForCausalLM(LlamaConfig(**config))
    else:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(2)
        model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(folder, safe_serialization=True)
    load_tokenizer(ModelConfig()).save_pretrained(folder)
    return folder


def sentencepiece_tokenizer(folder: Path | None = None):
    """A tokenizer that opens a text with SentencePiece's word mark "▁" as Llama 2's, Mistral
    v0.1-0.3's and Phi-3's do (Metaspace, prepend_scheme "first"), BPE trained on the demo
    corpus and the instruction format's markers (600 ids, within the built-in model's 768),
    with a [INST] chat template. With
    `folder`: saved there beside the built-in model's weights (a model folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [" ".join(json.loads(line).values()) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    markers = ["[INST] [/INST] Your", "### Instruction:\n### Input:\n### Response:\n"]
    backend.train_from_iterator(texts + markers * 10, trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    spm = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="<unk>")
    spm.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
                         "{% else %}{{ m.content + eos_token }}{% endif %}{% endfor %}")
    if folder is not None:
        from ft_ray.config import ModelConfig
        from ft_ray.models import save_base_model

        save_base_model(ModelConfig(), folder)
        spm.save_pretrained(folder)
    return spm


def tiny_moe(folder: Path, kind: str = "qwen3_moe", **settings):
    """A random tiny mixture of experts (4 experts, 2 per token, 2 layers unless `settings`
    say otherwise) with the built-in tokenizer; DeepSeek's and GLM-4.7-Flash's with latent
    attention (ranks 48 for q, 32 for k and v)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.config import ModelConfig
    from ft_ray.models import load_tokenizer
    from ft_ray.plan import LATENT_ATTENTION_TYPES

    tokenizer = load_tokenizer(ModelConfig())
    experts = ({"num_local_experts": 4} if kind == "mixtral"  # its experts are intermediate_size wide
               else {"n_routed_experts": 4, "moe_intermediate_size": 32} if kind == "glm4_moe"
               else {"n_routed_experts": 4, "moe_intermediate_size": 32, "n_group": 1, "topk_group": 1,
                     "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 16, "v_head_dim": 16, "head_dim": 8} if kind in LATENT_ATTENTION_TYPES
               else {"num_experts": 4, "moe_intermediate_size": 32})
    config = AutoConfig.for_model(kind, **{
        "hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_experts_per_tok": 2, **experts, "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id, **settings})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return ModelConfig(name_or_path=str(folder))


def make_bucket(endpoint: str, name: str):
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    return client


@pytest.fixture(scope="session")
def demo_sweep(s3_server, tmp_path_factory) -> dict:
    """`make demo-sweep` (`ft-ray tune configs/sweep-tiny.yaml`) piped to a file, storing in the
    local S3 server, every trial in W&B offline, the winners evaluated; run once, read by the
    demo tests (its winner against the demo run) and the sweep tests (trials, winners, W&B,
    report). Returns its summary, output, store client and folders."""
    tmp = tmp_path_factory.mktemp("demo-sweep")
    client = make_bucket(s3_server, "demo-sweeps")
    storage = ["storage.path=s3://demo-sweeps/runs", f"storage.endpoint_url={s3_server}"]
    settings = [*storage, f"tracking.wandb.dir={tmp / 'wandb'}",
                # every winner is evaluated: its weights come from the store to the model actors
                "eval.after_training=true", "eval.num_generations=2", "eval.max_new_tokens=16", "eval.max_examples=24"]
    code, out = piped(tmp, "tune", str(REPO / "configs" / "sweep-tiny.yaml"),
                      *(arg for setting in settings for arg in ("--set", setting)))
    assert code == 0, out
    uri = "s3://demo-sweeps/runs/tiny-sweep"
    summary = json.loads(client.get_object(Bucket="demo-sweeps", Key="runs/tiny-sweep/sweep.json")["Body"].read())
    return {"summary": summary, "out": out, "client": client, "uri": uri, "tmp": tmp, "overrides": storage}


@pytest.fixture(scope="session")
def reference_run(ray_local, tmp_path_factory) -> Path:
    """The fault tests' job (tests/faults.py) run once without faults; returns its run folder.
    Shared by the recovery tests and the lost-node test, which compare their runs with it."""
    from ft_ray.config import load_config
    from ft_ray.train.trainer import run_training
    from tests.faults import DATA, TRAIN

    tmp = tmp_path_factory.mktemp("reference")
    run_training(load_config(write_job(tmp, run_name="reference", data=DATA, train=TRAIN)))
    return tmp / "runs" / "reference"
