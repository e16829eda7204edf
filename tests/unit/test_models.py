"""Base models: built-in, local folder (the same loader a hub id uses), object storage, LoRA wrapping."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from ft_ray.config import LoraConfig, ModelConfig
from ft_ray.models import (apply_lora, count_parameters, load_base_model, load_quantized_model, load_tokenizer,
                           save_base_model)


def test_builtin_model_and_tokenizer_load_offline():
    tokenizer = load_tokenizer(ModelConfig())
    model = load_base_model(ModelConfig())
    assert model.config.model_type == "llama"
    assert model.config.vocab_size >= len(tokenizer)
    assert tokenizer.chat_template and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_local_folder_loads_the_same_weights(tmp_path):
    folder = save_base_model(ModelConfig(), tmp_path / "base")
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    local = ModelConfig(name_or_path=str(folder))
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        expected = load_base_model(ModelConfig()).eval()(ids).logits
        actual = load_base_model(local).eval()(ids).logits
    torch.testing.assert_close(actual, expected)
    assert load_tokenizer(local)("Good news").input_ids == load_tokenizer(ModelConfig())("Good news").input_ids


def test_a_model_in_object_storage_is_read_from_each_nodes_cache(ray_local, s3_server, tmp_path, monkeypatch, capfd):
    """model.name_or_path: s3://...: a tokenizer, a config (`ft-ray plan`) read no weights; the
    model's processes on a node wait for one copy of them (shown on the driver's progress
    board), later ones copy nothing; a file changed in the store is copied again; the variant
    merges into that base."""
    from concurrent.futures import ThreadPoolExecutor

    from ft_ray import progress, storage
    from ft_ray.cli import model_copy_line
    from ft_ray.config import ConfigError, InputError, config_from_dict
    from ft_ray.export import merge_adapter
    from ft_ray.models import BUILTIN, model_source, stored_base
    from ft_ray.plan import model_shape
    from ft_ray.train.trainer import _train_figures
    from tests.conftest import make_bucket

    monkeypatch.setattr(storage, "COPY_CHUNK", 2**20)  # the 3.6 MiB of weights in 4 reads
    monkeypatch.setattr(storage, "COPY_REPORT_S", 0.0)  # each read reported
    client = make_bucket(s3_server, "models")
    for file in BUILTIN["builtin:tiny-llama"].iterdir():
        client.upload_file(str(file), "models", f"tiny/{file.name}")
    client.put_object(Bucket="models", Key="tiny/original/consolidated.00.pth", Body=b"not read")
    client.put_object(Bucket="models", Key="tiny/model.gguf", Body=b"not read")
    client.put_object(Bucket="models", Key="lora/adapter_config.json", Body=b"{}")

    def job(name: str, **model):
        return config_from_dict({"model": {"name_or_path": name, **model}, "data": {"train": "t.jsonl"},
                                 "storage": {"path": "s3://models/runs", "endpoint_url": s3_server,
                                             "model_cache": str(tmp_path / "cache")}})

    stored = job("s3://models/tiny")
    with pytest.raises(InputError, match="no config.json of s3://models/tiny here"):
        model_shape(stored, network=False)  # `validate --offline`'s plan line: nothing copied, no request
    assert model_shape(stored) == (model_shape(job("builtin:tiny-llama"))[0], "config.json from the store")
    everything = sum(file.stat().st_size for file in BUILTIN["builtin:tiny-llama"].iterdir())  # not the .pth, .gguf
    assert model_copy_line(stored) == (f"disk: each node copies {everything / 2**20:.1f} MiB of s3://models/tiny to "
                                       f"storage.model_cache ({tmp_path / 'cache'}) once, before its workers load it")
    assert model_shape(stored, network=False)[0] == model_shape(job("builtin:tiny-llama"))[0]  # now cached
    assert load_tokenizer(stored.model)("Good news").input_ids == load_tokenizer(ModelConfig())("Good news").input_ids
    folder = Path(model_source(stored.model))
    assert not (folder / "model.safetensors").exists()
    board = progress._board_class().remote()
    with ThreadPoolExecutor(3) as pool:  # three processes of a node loading it at once
        assert set(pool.map(lambda _: model_source(stored.model, weights=True, board=board), range(3))) == {
            str(folder)}
    _, latest = ray_local.get(board.read.remote())
    weights = (BUILTIN["builtin:tiny-llama"] / "model.safetensors").stat().st_size
    assert latest["model_copy"]["copied"] == latest["model_copy"]["bytes"] == weights
    assert _train_figures({}, latest)[1].startswith("copied s3://models/tiny to a node's model cache (3.6 MiB, ")
    halfway = {"model_copy": {**latest["model_copy"], "copied": weights // 2}}
    assert " model cache: 1.8 of 3.6 MiB (" in _train_figures({}, halfway)[1]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        p.name for p in BUILTIN["builtin:tiny-llama"].iterdir())  # no subfolder, no other weight format
    copies = [line for line in capfd.readouterr().out.splitlines() if "model: copying" in line]
    assert len(copies) == 2 and "5 file(s)" in copies[0] and "1 file(s)" in copies[1], copies
    model = load_base_model(stored.model)
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, load_base_model(ModelConfig()).eval()(ids).logits)
    assert "model: copying" not in capfd.readouterr().out

    changed = (folder / "config.json").read_text() + "\n"
    client.put_object(Bucket="models", Key="tiny/config.json", Body=changed.encode())
    adapter = apply_lora(load_base_model(stored.model), LoraConfig(rank=4, alpha=8, dropout=0.0), "s3://models/tiny")
    assert "copying 1 file(s)" in capfd.readouterr().out and (folder / "config.json").read_text() == changed
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    adapter.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", base=stored_base(stored.model))
    with torch.no_grad():
        merged = load_base_model(ModelConfig(name_or_path=str(tmp_path / "merged"))).eval()
        torch.testing.assert_close(merged(ids).logits, adapter.eval()(ids).logits, atol=1e-5, rtol=1e-5)

    from types import SimpleNamespace

    # a small disk: 1 MiB free beside two models cached before, one last used 2 hours ago, one now
    small = tmp_path / "small-disk"
    old, recent = cached_models(small, {"old-1a2b": (4, 2 * 3600), "recent-3c4d": (1, 0)})
    capacity = 6 * 2**20
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: SimpleNamespace(
        free=capacity - sum(f.stat().st_size for f in small.rglob("*") if f.is_file())))
    elsewhere = job("s3://models/tiny").model
    elsewhere.use_storage(elsewhere.storage.model_copy(update={"model_cache": str(small)}))
    load_tokenizer(elsewhere)  # 37 KiB: fits
    assert old.is_dir()
    capfd.readouterr()
    load_base_model(elsewhere)  # 3.6 MiB: the model used 2 hours ago makes room
    assert not old.exists() and not (small / "old-1a2b.json").exists() and recent.is_dir()
    assert "model cache: removed old-1a2b (4.0 MiB, last used 2.0 h ago) to make room on this node" in capfd.readouterr().out
    capacity = 2**40  # room on the disk; storage.model_cache_max_gib removes the model used longest ago
    cached_models(small, {"older-5e6f": (1, 3 * 3600)})
    elsewhere.use_storage(elsewhere.storage.model_copy(update={"model_cache_max_gib": 5.5 / 1024}))
    (Path(model_source(elsewhere)) / "model.safetensors").unlink()
    load_base_model(elsewhere)  # 1 + 1 + 3.6 MiB, and the tokenizer's files
    assert not (small / "older-5e6f").exists() and recent.is_dir()
    capacity = 4 * 2**20  # the weights copied again, and only the model used now to make room with: refused
    (Path(model_source(elsewhere)) / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"s3://models/tiny needs 3.6 MiB more in storage.model_cache \(.*small-disk\), "
                                         r"which has 3.0 MiB free on this node \(less any model used in the last 60 "
                                         r"minutes\)"):
        load_base_model(elsewhere)
    assert recent.is_dir()
    monkeypatch.undo()
    with pytest.raises(InputError, match="model.name_or_path: no files in s3://models/none"):
        load_tokenizer(job("s3://models/none").model)
    with pytest.raises(InputError, match="s3://models/lora is a LoRA adapter, not a model.*"
                                         "model.adapter: s3://models/lora"):
        load_tokenizer(job("s3://models/lora").model)
    with pytest.raises(ConfigError, match="model.revision: a hub revision"):
        job("s3://models/tiny", revision="main")


def cached_models(cache: Path, models: dict[str, tuple[int, int]]) -> list[Path]:
    """Model folders in a node's model cache as `storage.cached_model` leaves them: name ->
    (MiB of weights, seconds since last used)."""
    import os
    import time

    folders = []
    for name, (mib, idle) in models.items():
        folder = cache / name
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * mib * 2**20)
        record = cache / f"{name}.json"
        record.write_text(json.dumps({"model.safetensors": [mib * 2**20, 0]}))
        os.utime(record, (time.time() - idle, time.time() - idle))
        folders.append(folder)
    return folders


def test_a_model_cache_over_its_size_removes_the_models_used_longest_ago(tmp_path):
    """storage.model_cache_max_gib: a copy that would pass it removes the models used longest
    ago first, until it fits; never one used in the last hour, nor one another process is
    copying (its lock held)."""
    import fcntl

    from ft_ray.storage import make_room

    cache = tmp_path / "cache"
    oldest, copying, old, recent = cached_models(cache, {"oldest": (1, 3 * 3600), "copying": (2, int(2.5 * 3600)),
                                                         "old": (3, 2 * 3600), "recent": (1, 60)})
    with open(cache / "copying.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        removed = make_room(cache / "new", 2**20, max_bytes=4 * 2**20)  # 7 MiB held + 1 new, at most 4
        assert removed == [oldest, old] and copying.is_dir() and recent.is_dir()
        assert sorted(p.name for p in cache.glob("*.json")) == ["copying.json", "recent.json"]
        assert make_room(cache / "new", 2**20, max_bytes=2 * 2**20) == []  # a recent use and a copy left: kept
    assert make_room(cache / "new", 2**20, max_bytes=2 * 2**20) == [copying]  # its copy done


def test_a_model_found_whole_is_never_removed_under_its_reader(tmp_path, monkeypatch):
    """A process finding a cached model whole and one removing it to make room take turns on
    its lock: the removal under way is waited for and the model copied again; a removal after
    it was found passes it over (just used)."""
    import os
    import threading
    import time

    from ft_ray import storage
    from ft_ray.config import StorageConfig
    from ft_ray.models import BUILTIN

    store = tmp_path / "store" / "tiny"  # a local folder stands for the store: the same code path
    shutil.copytree(BUILTIN["builtin:tiny-llama"], store)
    cache = StorageConfig(model_cache=str(tmp_path / "cache"))
    folder = storage.cached_model(str(store), cache, weights=True)
    record = folder.parent / f"{folder.name}.json"
    os.utime(record, (time.time() - 2 * 3600,) * 2)  # last used 2 hours ago
    removing, rmtree = threading.Event(), shutil.rmtree

    def slow_rmtree(path, **kwargs):  # the removal has begun, its files not yet gone
        removing.set()
        time.sleep(0.5)
        rmtree(path, **kwargs)

    monkeypatch.setattr(storage.shutil, "rmtree", slow_rmtree)
    other = folder.parent / "other-model"
    remover = threading.Thread(target=storage.make_room, args=(other, 2**20, 2**20))
    remover.start()
    assert removing.wait(10)
    assert storage.cached_model(str(store), cache, weights=True) == folder
    remover.join()
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in store.iterdir())
    assert storage.make_room(other, 2**20, 2**20) == [] and folder.is_dir()  # its use noted: kept


def test_unknown_builtin_lists_the_available_ones():
    with pytest.raises(ValueError, match="available: builtin:tiny-llama"):
        load_base_model(ModelConfig(name_or_path="builtin:huge"))


def test_remote_code_is_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_lora_trains_only_adapter_weights():
    model = apply_lora(load_base_model(ModelConfig()), LoraConfig(rank=4, target_modules=["q_proj", "v_proj"]),
                       base_model_path="/models/base")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert {n.split(".")[-3] for n in trainable} == {"lora_A", "lora_B"}
    assert sum("q_proj" in n for n in trainable) == sum("v_proj" in n for n in trainable) == 2 * 4  # 4 layers
    counts = count_parameters(model)
    assert counts["trainable"] < counts["total"] / 10
    assert model.peft_config["default"].base_model_name_or_path == "/models/base"


def test_qlora_base_is_4bit_and_only_adapters_change():
    import bitsandbytes as bnb

    from ft_ray.config import QuantizationConfig

    model = load_quantized_model(ModelConfig(), QuantizationConfig(compute_dtype="float32"), gradient_checkpointing=False)
    model = apply_lora(model, LoraConfig(rank=4), base_model_path="/models/base")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[1, 40, 50, 60, 70, 80]])
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in frozen.items())
    assert any(not torch.equal(after[n], p) for n, p in adapters.items())


def test_4bit_layers_keep_their_weights_through_evaluation_on_any_cpu():
    """bitsandbytes repacks 4-bit weights in place for eval on AVX512-BF16 CPUs, and fails for
    the tiny model's 352-wide MLP; ft-ray's loader turns that off on every CPU."""
    import bitsandbytes as bnb

    from ft_ray.config import QuantizationConfig
    from ft_ray.models import keep_4bit_weights_unpacked

    model = load_quantized_model(ModelConfig(), QuantizationConfig(compute_dtype="float32"), gradient_checkpointing=False)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    before = {id(m): m.weight.data.clone() for m in layers}
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 40, 50, 60]])).logits
    assert torch.isfinite(logits).all()
    assert all(torch.equal(m.weight.data, before[id(m)]) for m in layers)
    layers[0].support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    assert keep_4bit_weights_unpacked(model) == 1 and not layers[0].support_avx512bf16_for_cpu


def test_shipped_templates_by_name_for_a_base_model_without_one(tmp_path):
    """`model.chat_template: chatml` (shipped in ft_ray/assets/templates): ChatML turns, each
    assistant turn ending in the model's eos so generation stops there; `llama3`: Llama 3's
    header and <|eot_id|> turns (a Llama 3 base has the tokens but no template); `mistral`:
    [INST] turns, a system message before the first user turn's text, answers ending in the
    eos. An unknown name lists the shipped ones."""
    from ft_ray.config import InputError
    from ft_ray.data.formats import record_segments

    tokenizer = load_tokenizer(ModelConfig(chat_template="chatml", add_tokens=["<|im_start|>", "<|im_end|>"]))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
        f"<|im_start|>assistant\nHello.<|im_end|>{tokenizer.eos_token}\n")
    assert [text for text, trained in record_segments({"messages": messages}, "chat", tokenizer) if trained] == [
        f"Hello.<|im_end|>{tokenizer.eos_token}\n"]
    assert len(tokenizer("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1  # one token each
    conversation = {"messages": [*messages, {"role": "user", "content": "And?"}, {"role": "assistant", "content": "Bye."}]}
    llama3 = load_tokenizer(ModelConfig(chat_template="llama3"))
    assert "".join(text for text, _ in record_segments(conversation, "chat", llama3)) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>"
        "\n\nHi?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|><|start_header_id|>user"
        "<|end_header_id|>\n\nAnd?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBye.<|eot_id|>")
    assert [text for text, trained in record_segments(conversation, "chat", llama3) if trained] == [
        "Hello.<|eot_id|>", "Bye.<|eot_id|>"]
    mistral = load_tokenizer(ModelConfig(chat_template="mistral"))
    assert record_segments(conversation, "chat", mistral) == [
        ("[INST] Be brief.\n\nHi? [/INST]", False), (f" Hello.{mistral.eos_token}", True),
        ("[INST] And? [/INST]", False), (f" Bye.{mistral.eos_token}", True)]
    with pytest.raises(InputError, match=r"'chatm' is neither a template ft-ray ships \(chatml, llama3, mistral\), a "):
        load_tokenizer(ModelConfig(chat_template="chatm"))


def test_generate_puts_prompts_as_the_jobs_first_training_record_had_them(tmp_path):
    """`ft-ray generate`'s prompt format comes from the data's shape: the demo's Alpaca-shaped
    preference pairs take the instruction prompt, message lists the chat template; a job
    whose data is not here falls back to its data.format, else the chat template."""
    import json

    from ft_ray.config import config_from_dict
    from ft_ray.generate import prompt_format
    from tests.conftest import DEMO

    tokenizer = load_tokenizer(ModelConfig())
    (tmp_path / "chat.jsonl").write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi?"}],
                                                     "completion": [{"role": "assistant", "content": "Hello."}]}) + "\n")
    for train, expected in [(DEMO / "preference-train.jsonl", "instruction"), (tmp_path / "chat.jsonl", "chat"),
                            (DEMO / "train.jsonl", "instruction"), (tmp_path / "gone.jsonl", "chat")]:
        assert prompt_format(config_from_dict({"data": {"train": str(train)}}), tokenizer) == expected, train
    gone = config_from_dict({"data": {"train": str(tmp_path / "gone.jsonl"), "format": "completion"}})
    assert prompt_format(gone, tokenizer) == "completion"


def test_special_tokens_the_base_never_trained_start_at_the_mean_and_train_with_the_adapter(tmp_path):
    """`model.untrained_tokens: mend` (the default): the special tokens the chat template writes
    (and bos, eos) whose rows the base never trained (all-zero, or an output row several share,
    as Llama 3 and 3.1 base models ship their chat markers) start at the mean of the trained rows
    of their matrix, only on the side that was untrained; the pad token (never trained on), a
    reserved token no example holds and the built-in model (all trained) are left alone. An adapter run trains those rows and saves them with the adapter,
    which plain PEFT loads onto the base as shipped; `keep` changes nothing."""
    from ft_ray.config import config_from_dict
    from ft_ray.export import load_trainable_weights
    from ft_ray.models import mend_untrained_tokens, untrained_on_disk, untrained_tokens_warning
    from ft_ray.train.modeling import build_model
    from tests.conftest import UNTRAINED, untrained_llama

    folder = untrained_llama(tmp_path / "base")
    config = ModelConfig(name_or_path=str(folder))
    shipped = load_base_model(config)
    model = load_base_model(config)
    assert mend_untrained_tokens(model, config) == UNTRAINED
    # said before launch from the files: the candidates' rows and a sample of rows for the median
    tokenizer = load_tokenizer(config)
    assert untrained_on_disk(config, tokenizer) == UNTRAINED and untrained_on_disk(ModelConfig(), tokenizer) == []
    assert untrained_on_disk(ModelConfig(name_or_path="meta-llama/Llama-3.1-8B"), tokenizer) is None  # not here
    shutil.copytree(folder, tmp_path / "broken")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\xff" * 64)  # loading the weights says why
    assert untrained_on_disk(ModelConfig(name_or_path=str(tmp_path / "broken")), tokenizer) is None
    assert untrained_tokens_warning(config).startswith(
        "note: 4 special token(s) of " + str(folder) + " that examples hold were never trained (<|end|>, <|system|>, "
        "<|user|>, <|assistant|>): training sets their rows to the mean")
    assert "model.untrained_tokens: keep leaves them so" in untrained_tokens_warning(
        config.model_copy(update={"untrained_tokens": "keep"}))
    embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    old_embeddings, old_head = shipped.get_input_embeddings().weight, shipped.get_output_embeddings().weight
    trained_embeddings = [i for i in range(old_embeddings.shape[0]) if i not in (0, 2, 3, 4, 716)]
    trained_head = [i for i in range(old_head.shape[0]) if i not in (*UNTRAINED, 716)]
    for i in (2, 3, 4):
        torch.testing.assert_close(embeddings[i], old_embeddings[trained_embeddings].mean(0))
    for i in UNTRAINED:
        torch.testing.assert_close(head[i], old_head[trained_head].mean(0))
    torch.testing.assert_close(embeddings[[0, 5]], old_embeddings[[0, 5]])  # the pad, a trained embedding
    # every other row, <|reserved_0|>'s among them: no example holds it (the template never writes it)
    assert torch.equal(embeddings[6:], old_embeddings[6:]) and torch.equal(head[6:], old_head[6:])

    keep = config.model_copy(update={"untrained_tokens": "keep"})
    kept = load_base_model(keep)
    assert mend_untrained_tokens(kept, keep) == []
    assert torch.equal(kept.get_input_embeddings().weight, old_embeddings)
    assert mend_untrained_tokens(load_base_model(ModelConfig()), ModelConfig()) == []

    job = config_from_dict({"model": {"name_or_path": str(folder)}, "data": {"train": "t.jsonl"},
                            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0}})
    lora = build_model(job, str(folder))
    rows = {n: p for n, p in lora.named_parameters() if p.requires_grad and "trainable_tokens" in n}
    assert sorted(rows) == ["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default",
                            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    torch.testing.assert_close(rows["base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"],
                               head[UNTRAINED])
    ids = torch.tensor([[1, 4, 50, 60, 2, 5, 70, 2]])
    with torch.no_grad():
        for row in rows.values():
            row.add_(torch.randn_like(row) * 0.05)  # as training moves them
        trained = lora.eval()(ids).logits
    lora.save_pretrained(tmp_path / "adapter")
    from peft import PeftModel

    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(load_base_model(config), tmp_path / "adapter").eval()(ids).logits
        merged = PeftModel.from_pretrained(load_base_model(config), tmp_path / "adapter").merge_and_unload()(ids).logits
        plain = shipped.eval()(ids).logits
    torch.testing.assert_close(reloaded, trained)
    torch.testing.assert_close(merged, trained)
    resumed = build_model(job, str(folder))  # as a relaunch loads a checkpoint's adapter
    load_trainable_weights(resumed, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(resumed.eval()(ids).logits, trained)
    assert (trained - plain).abs().max() > 1e-3


def test_rope_scaling_stretches_the_window_for_training_export_and_the_variant_only(tmp_path):
    """`model.rope_scaling` loads the base with its RoPE stretched by max_seq_len over the
    window (rounded up) or `rope_factor`: linear divides every frequency by the factor, yarn
    leaves the fastest as they were; the merged export has the stretch in its config.json and
    answers as the adapter on the stretched base does past the old window; the base arms of
    `ft-ray eval` and `generate --compare` run the base's own RoPE. A model that scales its
    RoPE already, or a stretch of 1, is refused."""
    from pydantic import ValidationError
    from transformers import AutoConfig, AutoModelForCausalLM

    from ft_ray.config import InputError, config_from_dict
    from ft_ray.evaluation.scoring import load_arms
    from ft_ray.export import merge_adapter
    from ft_ray.generate import Answerer, Settings
    from ft_ray.models import BUILTIN, context_window_warning, rope_overrides

    plain = load_base_model(ModelConfig()).model.rotary_emb.inv_freq
    yarn = ModelConfig(max_seq_len=2100, rope_scaling="yarn")
    rope = rope_overrides(yarn)
    assert rope["max_position_embeddings"] == 3072 and rope["rope_parameters"] == {
        "rope_theta": 10000.0, "rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 1024}
    stretched = load_base_model(yarn)
    assert stretched.config.max_position_embeddings == 3072 and context_window_warning(yarn) is None
    frequencies = stretched.model.rotary_emb.inv_freq
    assert frequencies[0] == plain[0] and frequencies[-1] < plain[-1] / 2
    linear = ModelConfig(max_seq_len=2100, rope_scaling="linear", rope_factor=4)
    torch.testing.assert_close(load_base_model(linear).model.rotary_emb.inv_freq, plain / 4)
    assert "stretches builtin:tiny-llama's window to" in context_window_warning(
        linear.model_copy(update={"max_seq_len": 5000}))

    with pytest.raises(InputError, match="holds model.max_seq_len 256: nothing to stretch"):
        rope_overrides(ModelConfig(rope_scaling="yarn"))
    scaled = AutoConfig.from_pretrained(BUILTIN["builtin:tiny-llama"])
    scaled.rope_parameters = {"rope_theta": 10000.0, "rope_type": "linear", "factor": 3.0}
    scaled.save_pretrained(tmp_path / "scaled")
    with pytest.raises(InputError, match=r"scales its RoPE already \(rope_type 'linear', factor 3.0\)"):
        rope_overrides(ModelConfig(name_or_path=str(tmp_path / "scaled"), max_seq_len=2100, rope_scaling="yarn"))
    with pytest.raises(ValidationError, match="model.rope_factor needs model.rope_scaling"):
        ModelConfig(rope_factor=2)

    adapter = apply_lora(stretched, LoraConfig(rank=4, alpha=8, dropout=0.0), str(BUILTIN["builtin:tiny-llama"]))
    with torch.no_grad():
        for name, weight in adapter.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    adapter.save_pretrained(tmp_path / "adapter")
    merge_adapter(tmp_path / "adapter", tmp_path / "merged", rope=rope)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.rope_parameters["rope_type"] == "yarn" and merged.config.max_position_embeddings == 3072
    ids = torch.randint(3, 700, (1, 2000))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapter.eval()(ids).logits, atol=1e-4, rtol=1e-4)

    job = config_from_dict({"model": yarn.model_dump(), "data": {"train": "t.jsonl"}})
    base, variant, shared = load_arms(job, tmp_path / "adapter")
    assert not shared and base.config.rope_parameters["rope_type"] == "default"
    assert variant.get_base_model().config.rope_parameters["rope_type"] == "yarn"
    answerer = Answerer(job, tmp_path / "adapter", Settings(max_new_tokens=4, compare=True))
    assert answerer.base.config.rope_parameters["rope_type"] == "default"
    assert set(answerer.answer("Hello")) == {"variant", "base"}


def test_lora_targets_and_attention_a_model_lacks_are_said_before_launch(tmp_path):
    """From the model's layers built on the meta device (config.json only, no weights): a
    target PEFT would skip silently is a warning naming the model's linear layers (Phi-3 fuses
    q, k and v into qkv_proj), no target at all an error (GPT-NeoX), as is sdpa on a model that
    cannot run it (Gemma 2); the built-in model's defaults pass."""
    from transformers import AutoConfig

    from ft_ray.config import InputError
    from ft_ray.models import check_layout

    def model(kind: str, **shape) -> ModelConfig:
        AutoConfig.for_model(kind, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=800, pad_token_id=0, **shape).save_pretrained(tmp_path / kind)
        return ModelConfig(name_or_path=str(tmp_path / kind))

    lora = LoraConfig(modules_to_save=["lm_head", "embed_tokens"])
    assert check_layout(ModelConfig(), lora, scores=False) == []
    assert check_layout(model("phi3"), lora, scores=False) == [
        f"lora.target_modules: {tmp_path / 'phi3'} (Phi3ForCausalLM) has no q_proj, k_proj, v_proj: adapters go on "
        "o_proj only (its linear layers: o_proj, qkv_proj, gate_up_proj, down_proj, lm_head); name those to adapt, or "
        "all-linear"]
    assert check_layout(model("phi3"), LoraConfig(target_modules="all-linear"), scores=True) == []
    neox = model("gpt_neox")
    with pytest.raises(InputError, match=r"lora.target_modules: none of q_proj, k_proj, v_proj, o_proj is a linear "
                                         r"layer of .*gpt_neox \(GPTNeoXForCausalLM: query_key_value, dense, "):
        check_layout(neox, lora, scores=False)
    assert check_layout(neox, LoraConfig(target_modules=["query_key_value"], modules_to_save=["embed_tokens"]),
                        scores=False) == [f"lora.modules_to_save: {neox.name_or_path} (GPTNeoXForCausalLM) has no "
                                          "embed_tokens: not trained"]
    gemma = model("gemma2", head_dim=16)
    with pytest.raises(InputError, match=r"model.attn_implementation: .* \(Gemma2Config\) cannot run sdpa attention"):
        check_layout(gemma, None, scores=False)
    assert check_layout(gemma.model_copy(update={"attn_implementation": "eager"}), lora, scores=False) == []


def saved_and_reloaded(model, base: ModelConfig, folder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the LoRA model's logits, plain PEFT's from the adapter it saved in `folder` on `base`,
    the ids) on random ids, after every B matrix was set non-zero."""
    from peft import PeftModel

    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.05)
    model.save_pretrained(folder)
    ids = torch.randint(3, 700, (1, 24))
    with torch.no_grad():
        return (model.eval()(ids).logits, PeftModel.from_pretrained(load_base_model(base), str(folder)).eval()(ids).logits,
                ids)


def test_lora_reaches_a_mixture_of_experts_fused_expert_weights(tmp_path):
    """transformers 5 keeps a layer's experts as fused 3-D weights, not linear layers: their
    names (Qwen3-MoE's gate_up_proj, down_proj) train LoRA on every expert (PEFT would skip
    them without a word), as do transformers 4's names PEFT maps onto them (Mixtral's w1, w2,
    w3) and all-linear; before launch, lora.dropout there is an error (PEFT has none for
    them, and failed on the workers) and QLoRA says the experts stay 16-bit. The adapter
    loads in plain PEFT and merges into the same model."""
    from ft_ray.config import InputError, QuantizationConfig
    from ft_ray.export import merge_adapter
    from ft_ray.models import check_layout
    from tests.conftest import tiny_moe

    moe = tiny_moe(tmp_path / "moe")
    mixtral = tiny_moe(tmp_path / "mixtral", "mixtral")
    experts = LoraConfig(target_modules=["q_proj", "gate_up_proj", "down_proj"], dropout=0.0)
    assert check_layout(moe, experts, scores=False) == []
    assert check_layout(mixtral, LoraConfig(target_modules=["q_proj", "w1", "w2", "w3"], dropout=0.0), False) == []
    with pytest.raises(InputError, match=r"lora.dropout: PEFT's LoRA on .*\(MixtralForCausalLM\) down_proj, "
                                         r"gate.weight, gate_up_proj \(weights of its experts or router"):
        check_layout(mixtral, LoraConfig(target_modules="all-linear"), scores=False)
    with pytest.raises(InputError, match=r"lora.use_dora, lora.init: PEFT's LoRA on .* gate_up_proj \(weights"):
        check_layout(moe, experts.model_copy(update={"use_dora": True, "init": "pissa"}), scores=False)
    [qlora] = check_layout(moe, LoraConfig(), scores=False, quantized=True)
    assert "experts as fused weights (gate_up_proj, down_proj), which 4-bit quantization (linear layers only) leaves " \
           "16-bit" in qlora
    quantized = load_quantized_model(moe, QuantizationConfig(), gradient_checkpointing=False)
    dtypes = {name.split("layers.0.")[1]: p.dtype for name, p in quantized.named_parameters() if "layers.0." in name}
    assert dtypes["mlp.experts.gate_up_proj"] == dtypes["mlp.experts.down_proj"] == torch.bfloat16  # were made fp32
    assert dtypes["input_layernorm.weight"] == torch.float32 and not any(p.requires_grad for p in quantized.parameters())

    model = apply_lora(load_base_model(moe), experts, moe.name_or_path)
    trained = {name.split("layers.0.")[1] for name, p in model.named_parameters() if p.requires_grad and "layers.0." in name}
    assert {"mlp.experts.lora_A.default.weight", "mlp.experts.base_layer.lora_B.default.weight",
            "self_attn.q_proj.lora_A.default.weight"} <= trained
    ours, plain, ids = saved_and_reloaded(model, moe, tmp_path / "adapter")
    with torch.no_grad():
        assert (ours - load_base_model(moe).eval()(ids).logits).abs().max() > 1e-3  # the experts' adapters act
        merge_adapter(tmp_path / "adapter", tmp_path / "merged")
        merged = load_base_model(ModelConfig(name_or_path=str(tmp_path / "merged"))).eval()(ids).logits
    torch.testing.assert_close(plain, ours)
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)


def test_transformers_4_expert_names_beside_layers_of_those_names(tmp_path):
    """A mixture of experts whose other layers share the experts' transformers 4 names:
    Qwen2-MoE's shared expert (gate_proj, up_proj, down_proj), which PEFT leaves alone, adapts
    the shared expert and every routed expert, as transformers 4 did (before: the experts'
    down_proj only), and the adapter loads in plain PEFT as trained; GLM-4.5, whose names PEFT
    moves onto the experts, leaves its shared experts and dense layers' MLPs without adapters,
    which `validate` and `train` now say."""
    from ft_ray.models import check_layout
    from tests.conftest import tiny_moe

    qwen2, glm = tiny_moe(tmp_path / "qwen2", "qwen2_moe"), tiny_moe(tmp_path / "glm", "glm4_moe")
    names = LoraConfig(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], dropout=0.0)
    assert check_layout(qwen2, names, scores=False) == []
    model = apply_lora(load_base_model(qwen2), names, qwen2.name_or_path)
    adapted = {name.split("layers.1.mlp.")[1].rsplit(".lora_", 1)[0]: p.shape for name, p in model.named_parameters()
               if "lora_A" in name and "layers.1.mlp." in name}
    assert set(adapted) == {"experts", "experts.base_layer", "shared_expert.gate_proj", "shared_expert.up_proj",
                            "shared_expert.down_proj"}
    # rank 8 for each of the 4 experts; gate and up fused: twice that, as two adapters (PEFT's own mapping elsewhere)
    assert sorted(shape[0] for name, shape in adapted.items() if name.startswith("experts")) == [8 * 4, 16 * 4]
    ours, plain, _ = saved_and_reloaded(model, qwen2, tmp_path / "adapter")
    torch.testing.assert_close(plain, ours)

    for targets in (names, names.model_copy(update={"target_modules": "all-linear"})):
        [lost] = check_layout(glm, targets, scores=False)
        assert "PEFT takes gate_proj, up_proj, down_proj for transformers 4's names" in lost
        assert "so 6 linear layers of those names elsewhere get no adapter (model.layers.0.mlp.gate_proj" in lost
    glm_model = apply_lora(load_base_model(glm), names, glm.name_or_path)
    assert not any("shared_experts" in name or "layers.0.mlp" in name for name, _ in glm_model.named_parameters()
                   if "lora_" in name)  # what the warning says
