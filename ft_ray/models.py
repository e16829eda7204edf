"""Base models and tokenizers (hub id, local folder, or a built-in tiny model) and the
LoRA wrapping. Runs without Ray, so it can be tested and benchmarked on its own.
"""

from __future__ import annotations

import contextlib
import warnings as python_warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from ft_ray.config import InputError, JobConfig, LoraConfig, ModelConfig, StorageConfig
from ft_ray.console import LOG

# PEFT's adapter save looks for the base's config.json where the adapter says the base is (to
# save the whole embeddings of a grown vocabulary): an s3:// base's is in the node's model cache;
# the token rows ft-ray trains are saved with the adapter either way
python_warnings.filterwarnings("ignore", message="Could not find a config file in s3://", category=UserWarning)

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN = {"builtin:tiny-llama": ASSETS / "tiny-llama"}


def is_builtin(name_or_path: str) -> bool:
    return name_or_path.startswith("builtin:")


def _builtin_folder(name: str) -> Path:
    if name not in BUILTIN:
        raise ValueError(f"model.name_or_path: unknown built-in model {name!r} (available: {', '.join(BUILTIN)})")
    return BUILTIN[name]


def model_source(model: ModelConfig, weights: bool = False, board: Any = None) -> str:
    """What transformers loads `model.name_or_path` from: the built-in model's folder, a local
    folder, a hub id (`name` or `org/name`), or an s3:// folder's copy in this node's model
    cache (`storage.cached_model`; with `weights`, its weights too, else only what a tokenizer
    and a config read; `board`: the driver's progress board, shown the copy).

    Raises:
        InputError: a path (absolute, `./`, `../`, `~` or with more than one `/`) with no folder
            there; an s3:// folder with no files or a store that fails.
    """
    name = model.name_or_path
    if is_builtin(name):
        return str(_builtin_folder(name))
    if name.startswith("s3://"):
        from ft_ray.storage import cached_model

        try:
            path = cached_model(name, model.storage, weights, board)
        except OSError as e:
            raise InputError(f"model.name_or_path: {e}") from None
    else:
        path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            base = _json_file(path / "adapter_config.json").get("base_model_name_or_path")
            raise InputError(f"model.name_or_path: {name} is a LoRA adapter, not a model: set model.name_or_path to "
                             f"its base ({base or 'the model it was trained on'}) and model.adapter: {name} to train "
                             "on from it")
        return str(path)
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise InputError(f"model.name_or_path: no folder {name} (a hub id is `name` or `org/name`)")
    return name


def stored_base(model: ModelConfig) -> str | None:
    """An s3:// model's folder in this node's model cache, weights too (what merges an adapter
    into it: the adapter names its s3:// URI); None for other models (the adapter names them)."""
    return model_source(model, weights=True) if model.name_or_path.startswith("s3://") else None


def load_tokenizer(model: ModelConfig) -> Any:
    """The model's tokenizer; a missing pad token falls back to the eos token.

    Raises:
        InputError: not a folder here, and not in the Hugging Face cache nor on a reachable hub.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = from_model_source(AutoTokenizer.from_pretrained, model)
    except OSError as e:  # transformers says every missing, unreachable or invalid model this way
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"model.name_or_path: cannot load the tokenizer of {model.name_or_path}: {first}") from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.add_tokens:
        tokenizer.add_tokens(model.add_tokens, special_tokens=True)
    if model.chat_template:
        tokenizer.chat_template = chat_template_text(model.chat_template)
    return tokenizer


def local_model_config(model: ModelConfig) -> Any:
    """The model's config.json from the built-in model, a folder, the local hub cache or (an
    s3:// model) this node's model cache (no request: `OSError` when it is not here)."""
    from transformers import AutoConfig

    if model.name_or_path.startswith("s3://"):
        from ft_ray.storage import cached_folder

        source = str(cached_folder(model.name_or_path, model.storage))
        if not Path(source, "config.json").is_file():
            raise OSError(f"{model.name_or_path}: no config.json in this node's model cache")
    else:
        source = model_source(model)
    return AutoConfig.from_pretrained(source, revision=model.revision, local_files_only=True,
                                      trust_remote_code=model.trust_remote_code)


def model_config(model: ModelConfig) -> Any:
    """The model's config.json: from the folder or the local cache, else from the hub."""
    from transformers import AutoConfig

    try:
        return local_model_config(model)
    except OSError:
        return from_model_source(AutoConfig.from_pretrained, model)


def model_warnings(job: JobConfig) -> list[str]:
    """What `validate` and `train` say of the job's model before Ray starts: a sequence
    length past its context window, special tokens it never trained (a line starting "note: "
    where they will be mended, which `train`'s workers say themselves), LoRA targets it lacks
    (`check_layout`).

    Raises:
        InputError: a RoPE stretch it cannot take, no LoRA target it has, an attention it
            cannot run."""
    config = model_config(job.model)  # read once for the three
    rope_overrides(job.model, config)
    return [w for w in [context_window_warning(job.model, config), untrained_tokens_warning(job.model),
                        other_base_warning(job.model, job.storage)] if w] + (
        check_layout(job.model, job.lora if job.trains_adapter else None, job.objective == "reward_model", config,
                     quantized=job.method == "qlora"))


def untrained_tokens_warning(model: ModelConfig) -> str | None:
    """What `model.untrained_tokens` will do with the special tokens the base never trained
    (`untrained_on_disk`), or None when there are none or the weights are not here."""
    tokenizer = load_tokenizer(model)
    ids = untrained_on_disk(model, tokenizer)
    if not ids:
        return None
    names = ", ".join(tokenizer.convert_ids_to_tokens(ids[:6])) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
    if model.untrained_tokens == "mend":
        return (f"note: {len(ids)} special token(s) of {model.name_or_path} that examples hold were never trained "
                f"({names}): training sets their rows to the mean of the trained rows and trains them "
                "(model.untrained_tokens: mend)")
    return (f"{len(ids)} special token(s) of {model.name_or_path} that examples hold were never trained ({names}) "
            "and model.untrained_tokens: keep leaves them so: the model reads them as nothing and cannot learn to "
            "write them; mend trains them")


def check_layout(model: ModelConfig, lora: LoraConfig | None, scores: bool, config: Any = None,
                 quantized: bool = False) -> list[str]:
    """Warnings for `lora.target_modules` and `modules_to_save` names the model has no layer
    of (PEFT adapts the others and says nothing), and for a mixture of experts under QLoRA
    (`quantized`: its experts stay 16-bit), from its layers built on the meta device from its
    config.json (`config`, else read; no weights; [] when transformers cannot build them here).

    Raises:
        InputError: none of the targets is a linear layer or an expert weight of the model;
            LoRA on expert weights (or a router) with `lora.dropout`, DoRA or an init from the
            weights (PEFT has none there); the model cannot run `model.attn_implementation: sdpa`
            (Gemma 2: eager)."""
    import torch

    config = config or model_config(model)
    attention = "eager" if model.attn_implementation == "flash_attention_2" else model.attn_implementation  # flash-attn: maybe on the workers only
    try:
        with torch.device("meta"):
            skeleton = model_class(scores).from_config(config, attn_implementation=attention,
                                                       trust_remote_code=model.trust_remote_code)
    except ValueError as e:
        if "scaled_dot_product_attention" in str(e):
            raise InputError(f"model.attn_implementation: {model.name_or_path} ({type(config).__name__}) cannot run "
                             "sdpa attention in this transformers: set it to eager (or flash_attention_2)") from None
        return []
    except Exception:  # noqa: BLE001 - loading the model says what is wrong with it
        return []
    kind = type(skeleton).__name__
    experts = expert_weights(skeleton)
    warnings = []
    if quantized and experts:
        size = sum(skeleton.get_parameter(name).numel() for names in experts.values() for name in names)
        warnings.append(f"method qlora: {model.name_or_path} ({kind}) keeps its experts as fused weights "
                        f"({', '.join(experts)}), which 4-bit quantization (linear layers only) leaves 16-bit: "
                        f"{size / 1e9:.3g}B weights, {size * 2 / 2**30:.3g} GiB on every worker")
    if lora is None:
        return warnings
    modules = [name for name, _ in skeleton.named_modules()]
    linear = [name for name, module in skeleton.named_modules()
              if isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"]  # GPT-2's
    layers = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear)) + (
        f"; expert weights: {', '.join(experts)}" if experts else "")
    converted = peft_parameter_targets(skeleton, lora) if experts else []
    unsupported = [setting for setting, on in (("lora.dropout", lora.dropout), ("lora.use_dora", lora.use_dora),
                                               ("lora.init", lora.init in ("pissa", "olora", "orthogonal"))) if on]
    if converted and unsupported:
        raise InputError(f"{', '.join(unsupported)}: PEFT's LoRA on {model.name_or_path}'s ({kind}) "
                         f"{', '.join(sorted(converted))} (weights of its experts or router, not linear layers) has "
                         "no dropout, DoRA nor pissa/olora/orthogonal init: set lora.dropout: 0 (use_dora off, "
                         "init default or gaussian), or leave them out of lora.target_modules")
    if lora.target_modules != "all-linear":
        found = [t for t in lora.target_modules
                 if any(n == t or n.endswith("." + t) for n in linear) or t in experts or t in converted]
        missing = [t for t in lora.target_modules if t not in found]
        if not found:
            raise InputError(f"lora.target_modules: none of {', '.join(missing)} is a linear layer of "
                             f"{model.name_or_path} ({kind}: {layers}); name those to adapt, or all-linear")
        if missing:
            warnings.append(f"lora.target_modules: {model.name_or_path} ({kind}) has no {', '.join(missing)}: adapters go "
                            f"on {', '.join(found)} only (its linear layers: {layers}); name those to adapt, "
                            "or all-linear")
    lost = lost_to_peft(skeleton, lora) if experts else []
    if lost:
        names = ", ".join(dict.fromkeys(name.rsplit(".", 1)[-1] for name in lost))
        warnings.append(f"lora.target_modules: PEFT takes {names} for transformers 4's names of {model.name_or_path}'s "
                        f"({kind}) experts and adapts its fused experts instead, so {len(lost)} linear layers of those "
                        f"names elsewhere get no adapter ({', '.join(lost[:2])}, ...: shared experts, dense layers' "
                        "MLPs); PEFT cannot name them apart (lora.modules_to_save trains such a module whole)")
    unsaved = [t for t in lora.modules_to_save if not any(n.endswith(t) for n in modules)]
    if unsaved:
        warnings.append(f"lora.modules_to_save: {model.name_or_path} ({kind}) has no {', '.join(unsaved)}: "
                        "not trained")
    return warnings


def context_window_warning(model: ModelConfig, config: Any = None) -> str | None:
    """A warning when `model.max_seq_len` is past the positions the model was trained on (its
    config.json's `max_position_embeddings`, or the stretch of `model.rope_scaling`), from
    `config`, else read from the folder or the local cache only; None when it fits or the
    config is not here."""
    try:
        config = config or local_model_config(model)
    except (OSError, ValueError):
        return None
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int):
        return None
    if model.rope_scaling != "none":
        stretched = rope_overrides(model, config)["max_position_embeddings"]
        return None if model.max_seq_len <= stretched else (
            f"model.max_seq_len {model.max_seq_len} is longer than the {stretched} positions model.rope_scaling "
            f"stretches {model.name_or_path}'s window to: raise model.rope_factor")
    if model.max_seq_len <= window:
        return None
    return (f"model.max_seq_len {model.max_seq_len} is longer than {model.name_or_path}'s context window "
            f"({window} positions, max_position_embeddings): the positions past it were never trained "
            "(model.rope_scaling: yarn stretches the window)")


def rope_overrides(model: ModelConfig, config: Any = None) -> dict[str, Any]:
    """The config settings `model.rope_scaling` loads the model with: RoPE stretched by
    `model.rope_factor` (default: `max_seq_len` over the window, rounded up) from the window
    of its config.json (`config`, else read), which grows by the factor; {} without scaling.

    Raises:
        InputError: the model scales its RoPE already, or has a setting per layer type, or
            the stretch is not over 1.
    """
    import math

    if model.rope_scaling == "none":
        return {}
    config = config or model_config(model)
    params, window = getattr(config, "rope_parameters", None), getattr(config, "max_position_embeddings", None)
    where = f"model.rope_scaling: {model.name_or_path}"
    if not isinstance(params, dict) or "rope_theta" not in params or not isinstance(window, int):
        raise InputError(f"{where} has no single RoPE setting to stretch (config.json: rope_parameters "
                         f"{params!r}, max_position_embeddings {window!r})")
    if params.get("rope_type", "default") != "default":
        raise InputError(f"{where} scales its RoPE already (rope_type {params['rope_type']!r}, factor "
                         f"{params.get('factor')}): its context window is {window} positions")
    factor = float(model.rope_factor or math.ceil(model.max_seq_len / window))
    if factor <= 1:
        raise InputError(f"{where}'s context window ({window} positions) holds model.max_seq_len "
                         f"{model.max_seq_len}: nothing to stretch (model.rope_factor stretches it anyway)")
    stretch = {"rope_type": model.rope_scaling, "factor": factor}
    if model.rope_scaling == "yarn":  # its frequencies depend on the window the model trained on
        stretch["original_max_position_embeddings"] = window
    return {"rope_parameters": {**params, **stretch}, "max_position_embeddings": int(window * factor)}


def from_model_source(load: Callable[..., Any], model: ModelConfig, weights: bool = False, **options: Any) -> Any:
    """`load` (a transformers `from_pretrained`; `weights`: an AutoModel's, with the RoPE of
    `model.rope_scaling`) of `model_source(model)` at `model.revision`.

    With the hub unreachable (one request with no retries says so) a hub id loads from the
    Hugging Face cache at once, not after huggingface_hub's retries (about 25 s a file), and a
    model not in the cache fails as transformers says it.
    """
    source = model_source(model, weights)
    unreachable = _hub_unreachable(model)
    if weights:  # transformers 5.24's AutoModel looks for a PEFT adapter without the local_files_only given it
        options["adapter_kwargs"] = {"local_files_only": unreachable is not None}
        options.update(rope_overrides(model))
    try:
        loaded = load(source, revision=model.revision, trust_remote_code=model.trust_remote_code,
                      local_files_only=unreachable is not None, **options)
    except OSError as e:
        if unreachable:
            raise OSError(f"{model.name_or_path} is not in the Hugging Face cache, and the hub cannot be reached "
                          f"({unreachable})") from e
        raise
    if unreachable:
        LOG.warning(f"the Hugging Face hub cannot be reached ({unreachable}): {model.name_or_path} is the cached copy")
    return loaded


def _hub_unreachable(model: ModelConfig) -> str | None:
    """Why the Hugging Face hub cannot be reached for `model`; None for a built-in model or a
    folder, with `HF_HUB_OFFLINE=1`, and when the hub answers (for a missing, gated or private
    repository too: loading says which)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    name = model.name_or_path
    if constants.HF_HUB_OFFLINE or is_builtin(name) or "://" in name or Path(name).expanduser().is_dir():
        return None
    try:
        HfApi().model_info(name, revision=model.revision, timeout=10)  # HfApi(): the endpoint of now
    except HfHubHTTPError:
        return None
    except Exception as e:  # the HTTP client's own connect, timeout and proxy errors
        return f"{constants.ENDPOINT}: {str(e) or type(e).__name__}"
    return None


TEMPLATES = ASSETS / "templates"  # chat templates a job names: model.chat_template: chatml


def chat_template_text(template: str) -> str:
    """`model.chat_template`: a template ft-ray ships (by name), the text of a template file,
    or the template itself.

    Raises:
        InputError: neither a shipped name, an existing file nor Jinja text.
    """
    if "{%" in template or "{{" in template:
        return template
    if (TEMPLATES / f"{template}.jinja").is_file():
        return (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    path = Path(template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    shipped = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.jinja")))
    raise InputError(f"model.chat_template: {template!r} is neither a template ft-ray ships ({shipped}), a file nor "
                     "a Jinja template")


def fit_vocabulary(model: Any, config: ModelConfig) -> Any:
    """Grow the model's embeddings (and output layer) to a tokenizer with `model.add_tokens`;
    the new rows start at the mean of the old ones (transformers' mean resizing, which draws
    them about it). A model ZeRO-3 built partitioned gets them whole, drawn on each worker:
    rank 0's are broadcast and both partitioned at once, as the rest of the model is."""
    if config.add_tokens:
        size = len(load_tokenizer(config))
        if model.get_input_embeddings().num_embeddings < size:
            model.resize_token_embeddings(size)
            grown = [weight for weight in token_matrices(model) if not partitioned(weight)]
            if grown and built_partitioned(model):
                import deepspeed
                from transformers.integrations import deepspeed_config

                from ft_ray.train.collectives import broadcast_tensor_

                for weight in grown:
                    broadcast_tensor_(weight)
                deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())  # partitions what is whole
    return model


UNTRAINED_SCALE = 1e-3  # a row whose largest |value| is under this share of the median row's was never trained
SUM_ROWS = 8192  # rows summed at a time for a mean (no fp32 copy of a whole 128k-row matrix)


def mend_untrained_tokens(model: Any, config: ModelConfig) -> list[int]:
    """With `model.untrained_tokens: mend`, the special tokens a job's examples can hold (those
    its chat template writes, bos, eos) that the base never trained: their untrained
    input-embedding and output rows are set to the mean of the trained rows of the same matrix,
    in place. Returns their ids, which an adapter run then trains (`apply_lora`'s `tokens`);
    [] with `keep` or when none is.

    A row is untrained when all but zero (Llama 3 base's header and eot tokens), or when it is
    an output row that several such tokens share (Llama 3.1 base's). The pad token is left as
    it is unless it is the eos token: it is never trained on. A reward model (no output layer)
    is checked by its embeddings. A model ZeRO-3 partitioned as it was built has the two
    gathered whole on every worker, rank 0's mended rows partitioned again (`gathered_if_partitioned`)."""
    if config.untrained_tokens == "keep":
        return []
    matrices = token_matrices(model)
    with gathered_if_partitioned(matrices, modifier_rank=0):
        return _mend_rows(matrices, config)


def token_matrices(model: Any) -> list[Any]:
    """The weights with a row per token: the input embeddings, and the output layer's unless tied
    (none for a reward model)."""
    embeddings = model.get_input_embeddings().weight
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [embeddings] + ([output.weight] if output is not None and output.weight is not embeddings else [])


def partitioned(weight: Any) -> bool:
    """Whether ZeRO-3 holds `weight` partitioned (built under `deepspeed.zero.Init`, or by its engine)."""
    return hasattr(weight, "ds_id")


def whole_shape(weight: Any) -> tuple[int, ...]:
    """`weight`'s shape, whole where ZeRO-3 holds it partitioned (`partitioned`: its own is (0,))."""
    return tuple(weight.ds_shape if partitioned(weight) else weight.shape)


def built_partitioned(model: Any) -> bool:
    """Whether ZeRO-3 partitioned `model` as it was built (`deepspeed_engine.partitioned_at_load`)."""
    return any(partitioned(p) for p in model.parameters())


@contextlib.contextmanager
def gathered_if_partitioned(weights: list[Any], modifier_rank: int | None = None) -> Iterator[None]:
    """Those of `weights` that ZeRO-3 partitioned as the model was built (`deepspeed_engine.
    partitioned_at_load`) gathered whole on every worker for the block, then partitioned
    again from `modifier_rank`'s values (None: unchanged); the others as they are. A
    collective where any is partitioned."""
    parts = [w for w in weights if partitioned(w)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=modifier_rank):
        yield


def _mend_rows(matrices: list[Any], config: ModelConfig) -> list[int]:
    """`mend_untrained_tokens` on whole `matrices` (the input embeddings, an untied output layer)."""
    import torch

    tokenizer = load_tokenizer(config)
    candidates = sorted(i for i in mendable_tokens(tokenizer) if i < min(m.shape[0] for m in matrices))
    if not candidates:
        return []
    mended: set[int] = set()
    with torch.no_grad():
        for matrix in matrices:
            largest = torch.linalg.vector_norm(matrix.detach(), ord=float("inf"), dim=1).float()
            trained = largest >= UNTRAINED_SCALE * largest.median()
            index = torch.tensor(candidates, device=matrix.device)
            bad = index[never_trained(matrix[index], largest.median().item())]
            if not len(bad):
                continue
            trained[bad] = False
            matrix[bad] = mean_of_rows(matrix, trained).to(matrix.dtype)
            mended.update(bad.tolist())
    ids = sorted(mended)
    if ids:
        names = ", ".join(tokenizer.convert_ids_to_tokens(ids[:6])) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
        LOG.info(f"note: {len(ids)} special token(s) of {config.name_or_path} were never trained ({names}): their "
                 "rows start at the mean of the trained rows and train (model.untrained_tokens: mend)")
    return ids


def never_trained(rows: Any, median: float) -> Any:
    """Which of the candidate tokens' `rows` the base never trained: all but zero (the
    largest |value| under UNTRAINED_SCALE x `median`, the median row's) or the same row as
    another candidate's."""
    import torch

    largest = torch.linalg.vector_norm(rows.float(), ord=float("inf"), dim=1)
    _, shared, counts = torch.unique(rows, dim=0, return_inverse=True, return_counts=True)
    return (largest < UNTRAINED_SCALE * median) | (counts[shared] > 1)


SAMPLED_ROWS = 1024  # rows read for the median row of a matrix on disk (`untrained_on_disk`)


def untrained_on_disk(model: ModelConfig, tokenizer: Any) -> list[int] | None:
    """The special tokens `mend_untrained_tokens` will find, from the model's safetensors
    files here (a folder, the built-in model, the Hugging Face cache), reading the candidate
    tokens' rows of the embeddings and the output layer and the median of an even sample of
    rows, not the weights; None where the files are not here, do not read, or their matrices
    are not found."""
    import torch
    from safetensors import safe_open

    files = local_weight_files(model)
    if not files:
        return None
    tokens = mendable_tokens(tokenizer)
    names = ("embed_tokens.weight", "lm_head.weight")
    found: set[int] = set()
    seen = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as weights:
                for key in weights.keys():
                    if not key.endswith(names):
                        continue
                    matrix = weights.get_slice(key)
                    vocabulary = matrix.get_shape()[0]
                    candidates = sorted(i for i in tokens if i < vocabulary)
                    if not candidates:
                        continue
                    step = max(1, vocabulary // SAMPLED_ROWS)
                    sample = torch.cat([matrix[i:i + 1] for i in range(0, vocabulary, step)])
                    median = torch.linalg.vector_norm(sample.float(), ord=float("inf"), dim=1).median().item()
                    rows = torch.cat([matrix[i:i + 1] for i in candidates])
                    found.update(torch.tensor(candidates)[never_trained(rows, median)].tolist())
                    seen += 1
        except Exception:  # noqa: BLE001 - a file that does not read: loading the weights says why
            return None
    return sorted(found) if seen else None


def local_weight_files(model: ModelConfig) -> list[Path]:
    """The model's safetensors files in its folder, the built-in model's or its snapshot in
    the Hugging Face cache; [] when they are not here (an s3:// model's: the workers copy them)."""
    if "://" in model.name_or_path:
        return []
    source = Path(model_source(model)).expanduser()
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        try:
            source = Path(snapshot_download(model.name_or_path, revision=model.revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache (or not a hub id): nothing to read here
            return []
    return sorted(source.glob("*.safetensors"))


PROBES = (  # conversations whose rendering shows the special tokens a chat template writes
    {"conversation": [{"role": "system", "content": "a"}, {"role": "user", "content": "b"},
                      {"role": "assistant", "content": "c"}]},
    {"conversation": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"},
                      {"role": "user", "content": "d"}], "add_generation_prompt": True},
    {"conversation": [{"role": "user", "content": "b"},
                      {"role": "assistant", "content": "", "tool_calls": [
                          {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
                      {"role": "tool", "content": "2"}, {"role": "assistant", "content": "c"}],
     "tools": [{"type": "function", "function": {"name": "f", "description": "f",
                                                 "parameters": {"type": "object", "properties": {}}}}]},
)


def template_tokens(tokenizer: Any) -> set[int]:
    """The special tokens a job's examples can hold: bos, eos and those the tokenizer's chat
    template writes for a system, user and assistant turn, a generation prompt and a tool call
    (each probe the template refuses, e.g. a system turn, is skipped)."""
    special = {*tokenizer.all_special_ids, *tokenizer.added_tokens_decoder}
    found = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None}
    if getattr(tokenizer, "chat_template", None):
        for probe in PROBES:
            try:
                text = tokenizer.apply_chat_template(tokenize=False, **probe)
            except Exception:  # a template's raise_exception, or one that knows no tools
                continue
            found.update(i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i in special)
    return found


def mendable_tokens(tokenizer: Any) -> set[int]:
    """The tokens whose rows `mend_untrained_tokens` checks: `template_tokens` but the pad
    token, unless it is the eos (nothing trains on a pad token)."""
    ignored = set() if tokenizer.pad_token_id == tokenizer.eos_token_id else {tokenizer.pad_token_id}
    return template_tokens(tokenizer) - ignored


def stop_ids(tokenizer: Any) -> list[int]:
    """The tokens that end an answer: the eos, and the special token the chat template closes
    an assistant turn with where that is another (ChatML's `<|im_end|>` on a base Qwen,
    `<|eot_id|>` on a base Llama 3.1, `<end_of_turn>` on Gemma; `formats.turn_end`): a model
    fine-tuned on such turns ends its answers with it, and generation stops at either."""
    from ft_ray.data.formats import turn_end

    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    closing = turn_end(tokenizer)
    closing_id = None if closing is None else tokenizer.convert_tokens_to_ids(closing)
    return stops + [closing_id] if closing_id is not None and closing_id not in stops else stops


def mean_of_rows(matrix: Any, rows: Any) -> Any:
    """The fp32 mean of `matrix`'s rows where the boolean `rows` is true, summed in slices."""
    import torch

    total = torch.zeros(matrix.shape[1], dtype=torch.float32, device=matrix.device)
    for start in range(0, matrix.shape[0], SUM_ROWS):
        piece = matrix[start:start + SUM_ROWS]
        total += piece[rows[start:start + SUM_ROWS]].float().sum(dim=0)
    return total / rows.sum().clamp(min=1)


def token_rows(model: Any, ids: list[int]) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for `ids`: the input embeddings' module and (untied)
    the output layer's, by their names in `model`; None without ids."""
    if not ids:
        return None
    modules = [model.get_input_embeddings()]
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and output.weight is not modules[0].weight:  # a tied head follows the embeddings
        modules.append(output)
    names = {id(module): name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    return {names[id(module)]: list(ids) for module in modules}


def trained_in_full(config: ModelConfig) -> list[str]:
    """Modules an adapter run trains whole and saves with the adapter: the embeddings and the
    output layer when tokens are added with `model.new_tokens: whole`."""
    return ["embed_tokens", "lm_head"] if config.add_tokens and config.new_tokens == "whole" else []


def added_token_ids(config: ModelConfig) -> list[int]:
    """The ids of `model.add_tokens`, whose rows an adapter run trains with `model.new_tokens:
    rows` (none with `whole`: their modules train in full)."""
    if not config.add_tokens or config.new_tokens == "whole":
        return []
    return load_tokenizer(config).convert_tokens_to_ids(config.add_tokens)


def load_base_model(model: ModelConfig, dtype: Any = None, scores: bool = False, empty: bool = False) -> Any:
    """The pre-trained model from a hub id, a local folder, or the package's built-in files;
    with `scores`, as a sequence classifier with one score (a reward model to train); `empty`:
    its layers built from its config on the meta device, no weight read (a worker that takes
    them from rank 0; transformers' `device_map="meta"` still reads and converts each one)."""
    import torch

    options = {"dtype": dtype or torch.float32, "attn_implementation": model.attn_implementation}
    if empty:
        from transformers import AutoConfig

        config = from_model_source(AutoConfig.from_pretrained, model, **rope_overrides(model),
                                   **score_options(model, scores))
        with torch.device("meta"):
            return fit_vocabulary(model_class(scores).from_config(config, trust_remote_code=model.trust_remote_code,
                                                                  **options), model)
    return fit_vocabulary(from_model_source(model_class(scores).from_pretrained, model, weights=True, **options,
                                            **score_options(model, scores)), model)


def model_class(scores: bool) -> Any:
    """transformers' auto class of a causal LM, or (`scores`) of a sequence classifier."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if scores else AutoModelForCausalLM


def score_options(model: ModelConfig, scores: bool) -> dict[str, Any]:
    """A reward model's loading options: one score (a new head on a causal LM's weights), the
    pad token its forward finds each row's last token by."""
    return {"num_labels": 1, "pad_token_id": load_tokenizer(model).pad_token_id} if scores else {}


def load_quantized_model(model: ModelConfig, quantization: Any, gradient_checkpointing: bool,
                         scores: bool = False, frozen: bool = False) -> Any:
    """The base model with its linear layers in bitsandbytes 4-bit (QLoRA), frozen and
    prepared for adapter training (norms and embeddings kept in fp32, a mixture of experts'
    fused expert weights in `quantization.compute_dtype`); with `scores`, a sequence
    classifier whose score head stays unquantized; `frozen`: not prepared (what is not
    quantized stays in `quantization.compute_dtype`), for a model that never trains."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute_dtype = getattr(torch, quantization.compute_dtype)
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=getattr(torch, quantization.quant_storage),
        llm_int8_skip_modules=["score"] if scores else None)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    quantized = from_model_source(
        model_class(scores).from_pretrained, model, weights=True, quantization_config=bnb, dtype=compute_dtype,
        device_map={"": device}, attn_implementation=model.attn_implementation, **score_options(model, scores))
    keep_4bit_weights_unpacked(quantized)
    fit_vocabulary(quantized, model)  # embeddings are not quantized
    if frozen:  # never trained (a distillation teacher): the weights left unquantized stay in the compute dtype
        return quantized.requires_grad_(False)
    # PEFT's preparation casts every 16-bit weight it finds to fp32: a mixture of experts' fused
    # expert weights (not quantized: no linear layers) stay out of its sight, 16-bit and frozen
    experts = [(quantized.get_submodule(module), name) for names in expert_weights(quantized).values()
               for module, _, name in (full.rpartition(".") for full in names)]
    held = [module._parameters.pop(name) for module, name in experts]
    prepared = prepare_model_for_kbit_training(
        quantized, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False})
    for (module, name), weight in zip(experts, held):
        module._parameters[name] = weight.requires_grad_(False)
    return prepared


def keep_4bit_weights_unpacked(model: Any) -> int:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights; returns the layers changed.

    On CPUs with AVX512-BF16, a `Linear4bit` in eval mode under no_grad (evaluation, scoring)
    rewrites its weight in place into a CPU-only packed layout. That conversion fails for
    input sizes that are not a multiple of the quantization block (bitsandbytes 0.50: "shape
    '[128, 5]' is invalid for input of size 704" for 352 inputs, block 64), and it changes the
    weights that training and checkpointing then see. Without it the layer takes the same
    path as on any other CPU; nothing changes on GPUs.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def expert_weights(model: Any) -> dict[str, list[str]]:
    """A mixture of experts' fused expert weights, which transformers 5 keeps as 3-D parameters
    ([experts, out, in]) of one module per layer, not as linear layers: {name (gate_up_proj,
    down_proj): the parameters' full names}; {} for a dense model."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    counts = {getattr(config, key, None) for key in ("num_local_experts", "num_experts", "n_routed_experts")} - {None}
    found: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            continue
        for name, weight in module.named_parameters(recurse=False):
            shape = whole_shape(weight)  # built partitioned (ZeRO-3), its own is (0,)
            if len(shape) == 3 and shape[0] in counts:
                found.setdefault(name, []).append(f"{module_name}.{name}")
    return found


def expert_targets(lora: LoraConfig, experts: dict[str, list[str]]) -> list[str]:
    """The expert weights (`expert_weights`) LoRA adapts: all of them with `all-linear`, else
    those `lora.target_modules` names (PEFT's `target_parameters`: it would skip the names
    transformers 5 gave them, e.g. Qwen3-MoE's gate_up_proj, as no linear layer has them)."""
    if lora.target_modules == "all-linear":
        return sorted(experts)
    return [name for name in lora.target_modules if name in experts]


# transformers 4's names of an expert's layers, by the fused weight of transformers 5 they are part of
EXPERT_ALIASES = {"gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")), "down_proj": (("w2",), ("down_proj",))}


def peft_config(model: Any, lora: LoraConfig, also_in_full: list[str] = (), scores: bool = False,
                rows: dict[str, list[int]] | None = None) -> Any:
    """PEFT's LoRA config of the job's `lora` on `model` (`apply_lora`). transformers 4's names
    of the experts' layers (`EXPERT_ALIASES`) reach the fused experts as PEFT maps them for
    Mixtral and Qwen3-MoE, also where PEFT does not and the model has other layers of those
    names (Qwen2-MoE's shared expert: adapted too, as in transformers 4): gate and up as one
    fused weight of twice the rank and alpha."""
    import torch
    from peft import LoraConfig as PeftLoraConfig

    experts = expert_weights(model)
    targets, parameters, fused = lora.target_modules, expert_targets(lora, experts), {}
    if experts and targets != "all-linear":  # an expert weight's name: a parameter target, unless a linear layer's too
        linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        targets = [t for t in targets if t not in experts or t in linear]
        if not peft_moves(model, targets):
            for weight, aliases in EXPERT_ALIASES.items():
                named = next((names for names in aliases if set(names) <= set(targets) & linear), None)
                if weight in experts and named and weight not in parameters:
                    parameters.append(weight)
                    fused[rf".*\.{weight}"] = len(named)
    return PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets, target_parameters=parameters or None,
        rank_pattern={key: lora.rank * n for key, n in fused.items() if n > 1},
        alpha_pattern={key: lora.alpha * n for key, n in fused.items() if n > 1},
        task_type="SEQ_CLS" if scores else "CAUSAL_LM", use_dora=lora.use_dora,
        use_rslora=lora.use_rslora, init_lora_weights=True if lora.init == "default" else lora.init,
        modules_to_save=list(dict.fromkeys([*lora.modules_to_save, *also_in_full])) or None,
        trainable_token_indices=rows or None)


def converted_by_peft(model: Any, config: Any) -> Any:
    """A copy of a PEFT LoRA config as PEFT converts it for `model` when it builds the adapters
    (transformers 4's expert names moved onto transformers 5's fused experts, for the models
    whose experts PEFT knows: Mixtral, Qwen3-MoE, GLM-4.5...)."""
    import copy

    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    converted = copy.deepcopy(config)
    convert_peft_config_for_transformers(converted, model=model, conversions=None)
    return converted


def lost_to_peft(model: Any, lora: LoraConfig) -> list[str]:
    """The linear layers `lora.target_modules` names (with `all-linear`: all but the output
    layer) that get no adapter: PEFT moves their names onto the fused experts when it builds the
    adapters (`converted_by_peft`), the other layers of those names too (GLM-4.5's shared
    experts and its dense layers' MLPs)."""
    import torch

    config = peft_config(model, lora)
    converted = converted_by_peft(model, config)
    if isinstance(converted.target_modules, str) or set(converted.target_modules) == set(config.target_modules):
        return []  # nothing converted
    kept, output = set(converted.target_modules), model.get_output_embeddings()
    named = None if lora.target_modules == "all-linear" else set(config.target_modules)
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not output
            and (leaf := name.rsplit(".", 1)[-1]) not in kept and (named is None or leaf in named)]


MLP_NAMES = ("gate_proj", "up_proj", "down_proj")


def peft_takes_mlp_names(config: Any) -> bool:
    """Whether PEFT takes the MLP names (`MLP_NAMES`, transformers 4's) for the fused experts
    of a model of this config's type (`converted_by_peft`: it reads only the model type for
    named targets), so that linear layers of those names (dense layers' MLPs, shared experts)
    get no adapter, with all-linear too (`lost_to_peft` lists them on a model)."""
    import types

    from peft import LoraConfig as PeftLoraConfig

    converted = converted_by_peft(types.SimpleNamespace(config=config), PeftLoraConfig(target_modules=list(MLP_NAMES)))
    return not set(MLP_NAMES) <= set(converted.target_modules or ())


def peft_moves(model: Any, targets: list[str]) -> bool:
    """Whether PEFT maps any of `targets` onto `model`'s experts itself (`converted_by_peft`)."""
    from peft import LoraConfig as PeftLoraConfig

    return bool(converted_by_peft(model, PeftLoraConfig(target_modules=list(targets))).target_parameters)


def peft_parameter_targets(model: Any, lora: LoraConfig) -> list[str]:
    """The `lora.target_modules` names PEFT will adapt as parameters (experts, a router) rather
    than linear layers (with `all-linear`: those parameters): `expert_targets`, and the names of
    transformers 4 (Mixtral's w1, w2, w3; Qwen-MoE's gate_proj, up_proj, down_proj) that PEFT
    maps onto the fused weights, with `all-linear` the router's too; [] for none."""
    config = peft_config(model, lora)
    converted = converted_by_peft(model, config)
    parameters = sorted(set(converted.target_parameters or ()))
    if not parameters or lora.target_modules == "all-linear":
        return parameters
    moved = [t for t in config.target_modules if t not in set(converted.target_modules or ())]
    return [*(config.target_parameters or ()), *moved]  # `expert_targets`, and what PEFT moved


def causal_lm(model: Any) -> Any:
    """The transformers model inside PEFT's wrapper (the model itself where there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply_lora(model: Any, lora: LoraConfig, base_model_path: str, also_in_full: list[str] = (),
               scores: bool = False, tokens: list[int] = ()) -> Any:
    """Wrap `model` with trainable LoRA adapters; the base weights are frozen but for
    `lora.modules_to_save` and `also_in_full` (see `trained_in_full`); a reward model's
    (`scores`) new score head trains whole (PEFT's SEQ_CLS task saves it with the adapter);
    the rows of `tokens` (`mend_untrained_tokens`, `added_token_ids`) in the embeddings and the
    output layer train and are saved with the adapter (PEFT's trainable tokens), unless those
    modules train whole.

    `base_model_path` is written into the adapter config, so the saved adapter names a
    base that `PeftModel.from_pretrained` can load without ft-ray.
    """
    from peft import get_peft_model

    model.name_or_path = base_model_path  # PEFT records the model's own name as the base
    whole = {*lora.modules_to_save, *also_in_full}
    rows = {name: ids for name, ids in (token_rows(model, list(tokens)) or {}).items() if name not in whole}
    return get_peft_model(model, peft_config(model, lora, also_in_full, scores, rows))


# the `lora` settings a continued adapter (`model.adapter`) brings: ft-ray's key -> its adapter_config.json key
ADAPTER_SETTINGS = {"rank": "r", "alpha": "lora_alpha", "target_modules": "target_modules", "use_dora": "use_dora",
                    "use_rslora": "use_rslora", "modules_to_save": "modules_to_save"}


def _json_file(path: Path | str, storage: StorageConfig | None = None) -> dict:
    """A JSON object from a local file, or from object storage (`storage`: its endpoint)."""
    import json

    from ft_ray.storage import filesystem_for

    try:
        fs, inside = filesystem_for(str(path), storage or StorageConfig())
        with fs.open_input_stream(inside) as f:
            loaded = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it: {e}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: not a JSON object")
    return loaded


def adapter_folder(path: str, storage: StorageConfig) -> str:
    """The adapter folder `model.adapter` names, a local path or an s3:// URI (read with
    `storage`'s endpoint): the folder itself (adapter_config.json), a run folder's `adapter/`,
    a checkpoint's `model/` or a sweep winner's `weights/`; a checkpoint's or winner's files
    are checked against its manifest.

    Raises:
        InputError: none of those is there, or the checkpoint or winner is incomplete.
    """
    import pyarrow.fs as pafs

    from ft_ray.storage import filesystem_for
    from ft_ray.train.checkpoints import MANIFEST, STATE_FILE, stored_digest_problem, stored_files_problem

    root = path.rstrip("/") if "://" in path else str(Path(path).expanduser().absolute())
    places = ("", "/adapter", "/model", "/weights")
    try:
        fs, inside = filesystem_for(root, storage)
        folder, *configs, manifest, state, winner = fs.get_file_info(
            [inside, *(f"{inside}{place}/adapter_config.json" for place in places), f"{inside}/{MANIFEST}",
             f"{inside}/{STATE_FILE}", f"{inside}/winner.json"])
        if folder.type != pafs.FileType.Directory:
            raise InputError(f"model.adapter: no folder {path} (a local folder every worker sees, or an s3:// one)")
        found = next((place for place, info in zip(places, configs) if info.type == pafs.FileType.File), None)
        if found is None:
            raise InputError(f"model.adapter: {path} holds no LoRA adapter (adapter_config.json), nor does its "
                             "adapter/, model/ or weights/ (a run, checkpoint or sweep winner of a lora/qlora run)")
        problem = None
        if pafs.FileType.File in (manifest.type, state.type):  # a checkpoint (its manifest written last)
            problem = stored_digest_problem(fs, inside)
        elif winner.type == pafs.FileType.File:
            files = _json_file(f"{root}/winner.json", storage).get("files") or {}
            problem = stored_files_problem(fs, inside, files)
    except OSError as e:
        raise InputError(f"model.adapter: cannot read {path}: {e}") from None
    if problem:
        raise InputError(f"model.adapter: {path}: {problem} (incomplete or changed since it was written)")
    return root + found


def with_adapter(job: JobConfig) -> JobConfig:
    """The job with the `lora` settings of the adapter it continues (`model.adapter`, resolved
    to its folder), as `validate`, `plan`, `train` and `tune` see it; the job unchanged without one.

    Raises:
        InputError: the adapter is not there or not LoRA for a causal LM.
        ConfigError: the job sets a `lora` key the adapter has otherwise (one line each).
    """
    from ft_ray.config import ConfigError

    if not job.model.adapter:
        return job
    folder = adapter_folder(job.model.adapter, job.storage)
    saved = _json_file(f"{folder}/adapter_config.json", job.storage)
    if saved.get("peft_type") != "LORA" or saved.get("task_type") not in (None, "CAUSAL_LM"):
        raise InputError(f"model.adapter: {folder} is a {saved.get('peft_type')} adapter for {saved.get('task_type')}; "
                         "ft-ray continues LoRA adapters of causal LMs")
    targets = saved.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    targets += [name.rsplit(".", 1)[-1] for name in saved.get("target_parameters") or []]  # experts
    in_full = trained_in_full(job.model)
    settings = {key: saved.get(theirs) for key, theirs in ADAPTER_SETTINGS.items()}
    settings.update(target_modules=sorted(set(targets)), use_dora=bool(settings["use_dora"]),
                    use_rslora=bool(settings["use_rslora"]),
                    modules_to_save=[m for m in settings["modules_to_save"] or [] if m not in in_full])
    ours = job.lora
    conflicts = [
        f"lora.{key}: {getattr(ours, key)!r}, but the adapter it continues (model.adapter: {folder}) has {value!r}: "
        f"a continued adapter keeps its own; leave lora.{key} out"
        for key, value in settings.items()
        if key in ours.model_fields_set and _setting(getattr(ours, key)) != _setting(value)]
    if conflicts:
        raise ConfigError(conflicts)
    lora = ours.model_copy(update={**settings, "init": "default"})
    return job.model_copy(update={"model": job.model.model_copy(update={"adapter": folder}), "lora": lora})


def with_start_adapter(job: JobConfig) -> JobConfig:
    """For `ft-ray eval` and `generate --compare`: the job with `model.adapter` resolved to its
    folder (`adapter_folder`), or without it where it is gone (a warning): the run is compared
    without the adapter it trained on from (the `adapter start` arm, `start:`), the only use
    those have for it."""
    if not job.model.adapter:
        return job
    try:
        folder: str | None = adapter_folder(job.model.adapter, job.storage)
    except InputError as e:
        LOG.warning(f"{e}: compared without the adapter it trained on from")
        folder = None
    return job.model_copy(update={"model": job.model.model_copy(update={"adapter": folder})})


def _setting(value: Any) -> Any:
    return sorted(value) if isinstance(value, list) else value


def adapter_line(job: JobConfig) -> str:
    """What a job that trains on from an adapter (`model.adapter`) starts from, in one line."""
    lora = job.lora
    kinds = "".join(f", {name}" for name, used in (("DoRA", lora.use_dora), ("rsLoRA", lora.use_rslora)) if used)
    return (f"model: trains on from the adapter {job.model.adapter} (rank {lora.rank}, alpha {lora.alpha:g}{kinds}, "
            f"on {', '.join(lora.target_modules)})")


def other_base_warning(model: ModelConfig, storage: StorageConfig) -> str | None:
    """Where the adapter a job trains on from (`model.adapter`) names another base model than
    the job's (ft-ray's copy of a built-in model, a run's `base_model/`, counts as the built-in)."""
    if not model.adapter:
        return None
    theirs = _json_file(f"{model.adapter}/adapter_config.json", storage).get("base_model_name_or_path") or ""
    if theirs in (model.name_or_path, model_source(model)) or (
            is_builtin(model.name_or_path) and Path(theirs).name == "base_model"):
        return None
    return (f"model.adapter was trained on {theirs or 'a base it does not name'}, this job's base is "
            f"{model.name_or_path}: on another base model (even one of the same shape) it is not the model it "
            "learned to be")


START_ADAPTER = "start"  # PEFT's name for the adapter a run trained on from, loaded beside its own to compare


def load_start_adapter(model: Any, job: JobConfig) -> None:
    """Load the adapter `job`'s run trained on from (`model.adapter`; an s3:// one downloaded
    while it loads) into the PEFT `model` beside its own, as `START_ADAPTER`."""
    from ft_ray.storage import local_folder

    with local_folder(job.model.adapter, job.storage, "ft-ray-adapter-") as folder:
        model.load_adapter(str(folder), adapter_name=START_ADAPTER)


@contextlib.contextmanager
def start_adapter_on(model: Any) -> Iterator[Any]:
    """`model` (a PEFT model holding `START_ADAPTER` beside its own) answering with the adapter
    its run trained on from, for the time of the block."""
    model.set_adapter(START_ADAPTER)
    try:
        yield model
    finally:
        model.set_adapter("default")


def continue_adapter(model: Any, job: JobConfig, base_model_path: str, tokens: list[int] = (),
                     trainable: bool = True) -> Any:
    """`model` with the adapter of `model.adapter` (`with_adapter` resolved it) loaded as PEFT
    saved it, trainable (its rows of `tokens` too) unless not `trainable`: a DPO/KTO/GRPO
    reference. Its dropout is the job's `lora.dropout` and the base it names `base_model_path`.

    Raises:
        InputError: the job trains token rows (`mend_untrained_tokens`, `added_token_ids`) that
            the adapter does not.
    """
    from peft import PeftConfig, PeftModel

    from ft_ray.storage import local_folder

    with local_folder(job.model.adapter, job.storage, "ft-ray-adapter-") as folder:  # an s3:// one: downloaded
        settings = PeftConfig.from_pretrained(str(folder))
        settings.base_model_name_or_path, settings.lora_dropout = base_model_path, job.lora.dropout
        saved_rows = settings.trainable_token_indices or {}
        saved_rows = (set(saved_rows) if isinstance(saved_rows, list)
                      else {i for ids in saved_rows.values() for i in ids})
        missing = sorted(set(tokens) - saved_rows)
        if trainable and missing and set(settings.modules_to_save or ()).isdisjoint(("embed_tokens", "lm_head")):
            raise InputError(f"model.adapter: this run would train the rows of token ids {missing[:8]} (special tokens "
                             "the base never trained, or model.add_tokens), which the adapter it continues does not: "
                             "set model.untrained_tokens: keep, as the adapter was trained")
        return PeftModel.from_pretrained(model, str(folder), config=settings, is_trainable=trainable)


def save_base_model(model: ModelConfig, folder: Path) -> Path:
    """Write the base model and tokenizer as a plain HF folder (safetensors).

    Used for built-in models: their adapters point at this copy, which outlives an
    upgrade or removal of ft-ray.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        shipped = as_shipped(model)
        load_base_model(shipped).save_pretrained(folder, safe_serialization=True)
        load_tokenizer(shipped).save_pretrained(folder)
    return folder


def own_rope(model: ModelConfig) -> ModelConfig:
    """`model` with the RoPE of its config.json (no `rope_scaling`): the base model a
    comparison runs, as it would run without fine-tuning."""
    return model.model_copy(update={"rope_scaling": "none", "rope_factor": None})


def as_shipped(model: ModelConfig) -> ModelConfig:
    """`model` without what a job changes of it: its tokens, chat template and RoPE."""
    return own_rope(model).model_copy(update={"add_tokens": [], "chat_template": None})


def count_parameters(model: Any) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
    """Continuation of `prompt` (greedy; sampled at `temperature` when above 0), decoded
    without special tokens."""
    import torch

    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
    model.eval()
    with torch.no_grad():
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             **sampling, pad_token_id=tokenizer.pad_token_id, eos_token_id=stop_ids(tokenizer))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

