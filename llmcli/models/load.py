"""Where a model lives and loading it: hub ids, model dirs and llmcli run dirs (final model or a
checkpoint), each model's config, context length and labels, and the model + tokenizer that
`generate`, `eval` and rewards run (a LoRA run dir: merged/, else base model + adapter). Safetensors
only unless `model.allow_pickle`; remote code only if `model.trust_remote_code`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.config import ModelSection
from llmcli.data.tokenization import load_tokenizer_for, looks_like_path
from llmcli.errors import ConfigError, first_line
from llmcli.layout import holds_finished_run, latest_checkpoint, list_checkpoints
from llmcli.models import heads
from llmcli.models.lora import HEAD_CONFIG
from llmcli.tasks import Task

# --------------------------------------------------------------------------------------------
# Where a model lives


def resolve_model_path(name_or_path: str, checkpoint: str | None = None) -> str:
    """A local dir (final model of a run dir, or `checkpoint` 'latest'/N of it) or a hub id."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        if checkpoint:
            if checkpoint == "latest":
                ckpt = latest_checkpoint(path)
                if ckpt is None:
                    raise ConfigError(f"--checkpoint latest: {path} holds no complete checkpoint")
                return str(ckpt)
            chosen = path / f"checkpoint-{checkpoint}"
            if not chosen.is_dir():
                steps = ", ".join(str(s) for s, _ in list_checkpoints(path)) or "none"
                raise ConfigError(f"--checkpoint {checkpoint}: no {chosen} (checkpoints: {steps})")
            return str(chosen)
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            return str(path)
        ckpt = latest_checkpoint(path, warn=False)
        if ckpt is not None and not holds_finished_run(path):
            console.warn(f"{path} has no final model yet; using its latest checkpoint {ckpt.name}")
            return str(ckpt)
        raise ConfigError(f"model dir {path} holds no model (no config.json)")
    if path.exists():
        raise ConfigError(f"model path {path} is a file; give the model's directory")
    if looks_like_path(name_or_path):
        raise ConfigError(f"model path not found: {name_or_path}")
    return name_or_path


def check_weights(path: str, allow_pickle: bool) -> None:
    """A local model dir must hold weights; pickle-only weights need an explicit opt-in."""
    p = Path(path)
    if not p.is_dir():
        return
    if (p / "adapter_config.json").exists() and not (p / "config.json").exists():
        return
    if list(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").exists():
        return
    if list(p.glob("*.bin")) or list(p.glob("*.pt")):
        if allow_pickle:
            return
        raise ConfigError(f"{p} has only pickle weights (.bin); set model.allow_pickle=true if you trust the file")
    raise ConfigError(f"model dir {p} holds no weights (no *.safetensors)")


def load_pretrained_config(path: str, m: ModelSection):
    from transformers import AutoConfig

    from llmcli import models

    models.register()  # a saved llmcli architecture (model_type: gru) loads like any other

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except Exception as err:
        raise ConfigError(f"could not load the model config of '{path}': {first_line(err)}") from None


# Models whose position ids start at padding_idx + 1 (fairseq's make_positions; transformers'
# create_position_ids_from_input_ids): RoBERTa's 514 position rows hold 512 usable positions.
OFFSET_POSITION_TYPES = frozenset({
    "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod", "ibert",
    "longformer", "luke", "lilt", "markuplm", "layoutlmv3", "mpnet", "esm",
})


def context_length(config) -> int | None:
    """Tokens the model can attend over: its position-table size less any position-id offset."""
    for attr in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value - _position_offset(config)
    return None


def context_is_a_limit(config) -> bool:
    """False for models without a position table (llmcli's GRU): their `context_length` is only a
    default window for blocks and eval, and longer inputs are fine."""
    return bool(getattr(config, "context_is_a_limit", True))


def _position_offset(config) -> int:
    model_type = getattr(config, "model_type", None)
    if model_type not in OFFSET_POSITION_TYPES:
        return 0
    if model_type == "esm" and getattr(config, "position_embedding_type", "absolute") != "absolute":
        return 0  # ESM-2's rotary positions use no table
    padding_idx = 1 if model_type == "mpnet" else getattr(config, "pad_token_id", None)  # MPNet hard-codes 1
    return (1 if padding_idx is None else padding_idx) + 1


def load_kwargs(m: ModelSection, **extra) -> dict[str, Any]:
    """from_pretrained options: safetensors only unless allow_pickle, remote code only if trusted."""
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code, "revision": m.revision, **extra}
    if not m.allow_pickle:
        kwargs["use_safetensors"] = True
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    return kwargs


def check_vocab(model, tokenizer) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "use the model's own tokenizer (unset model.tokenizer_name)"
        )


def user_labels(config) -> dict[str, int] | None:
    """A pretrained classifier's label2id, unless it is the library's LABEL_0.. placeholder."""
    label2id = getattr(config, "label2id", None) or {}
    if not label2id or all(name.startswith("LABEL_") for name in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}


# --------------------------------------------------------------------------------------------
# Inference (generate, eval)


def pick_device(device: str | None, dtype: str | None):
    """(torch.device, torch.dtype): CUDA bf16 (fp16 without bf16) > MPS fp16 > CPU fp32, unless forced."""
    import torch

    if device is None:
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{device}' (cuda, cuda:N, mps, cpu)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available")
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": torch.float32, "fp32": torch.float32}
    if dtype is not None:
        if dtype not in names:
            raise ConfigError(f"--dtype: unknown dtype '{dtype}' (bfloat16, float16, float32)")
        return dev, names[dtype]
    if dev.type == "cuda":
        return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "mps":
        return dev, torch.float16
    return dev, torch.float32


def _inference_dir(path: str) -> tuple[str, bool]:
    """Where the model to load is, and whether it is a LoRA adapter without a full model: a LoRA run
    dir gives its merged/ model when there is one, else itself (base model + adapter)."""
    local = Path(path)
    if not (local.is_dir() and (local / "adapter_config.json").exists() and not (local / "config.json").exists()):
        return path, False
    if (local / "merged" / "config.json").exists():
        return str(local / "merged"), False
    return path, True


def inference_config(path: str, m: ModelSection):
    """The config of the model `load_for_inference(path)` loads (for a LoRA run dir: merged/, else
    the base model's config with the trained head of head_config.json)."""
    path, adapter_only = _inference_dir(path)
    if not adapter_only:
        return load_pretrained_config(path, m)
    local = Path(path)
    return _adapter_model_config(local, *_read_adapter(local), m)


def _read_adapter(local: Path) -> tuple[dict[str, Any], str]:
    """adapter_config.json and the base model it names."""
    adapter = json.loads((local / "adapter_config.json").read_text())
    base = adapter.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{local / 'adapter_config.json'} names no base model (base_model_name_or_path)")
    return adapter, base


def _adapter_model_config(local: Path, adapter: dict[str, Any], base: str, m: ModelSection):
    """The base model's config, with a classifier adapter's head (head_config.json) on it."""
    config = load_pretrained_config(base, m)
    if adapter.get("task_type") != "SEQ_CLS":
        return config  # head_config.json describes a classifier's head only
    head = local / HEAD_CONFIG
    if not head.exists() and local.name.startswith("checkpoint-"):
        head = local.parent / HEAD_CONFIG  # a checkpoint's head is its run's
    if head.exists():
        try:
            h = json.loads(head.read_text())
            config.update({**h, "id2label": {int(k): v for k, v in h["id2label"].items()}})
        except (ValueError, KeyError, AttributeError) as err:
            raise ConfigError(f"{head}: not a head config llmcli wrote ({first_line(err)})") from None
    return config


def load_for_inference(path: str, m: ModelSection, device: str | None = None, dtype: str | None = None):
    """(model in eval mode on its device, tokenizer, kind) for a model dir, run dir or hub id.

    A LoRA run dir loads its merged/ model when there is one, else base model + adapter. A classifier
    with a model.onnx (`llmcli export`) runs on ONNX Runtime when `m.runtime` says so (`onnx.choose`:
    `auto` takes it on a CPU in fp32 when it matches the weights).
    """
    path, adapter_only = _inference_dir(path)
    dev, torch_dtype = pick_device(device, dtype)
    if m.runtime == "onnx" and adapter_only:
        raise ConfigError(f"--runtime onnx: {path} is a LoRA adapter; `llmcli export --format hf` it, then export the full model")
    if m.runtime != "torch" and not adapter_only and Path(path).is_dir() and (m.runtime == "onnx" or (dev.type == "cpu" and str(torch_dtype) == "torch.float32")):
        from llmcli.models import onnx

        config = load_pretrained_config(path, m)
        kind = heads.task_of_model(config)
        if onnx.choose(path, kind, m.runtime):
            console.info(f"labelling with ONNX Runtime: {Path(path) / onnx.ONNX_FILE}")
            return onnx.OnnxClassifier(Path(path) / onnx.ONNX_FILE, config), load_tokenizer_for(path, m), kind
    if adapter_only:
        model, tokenizer, kind = load_adapter(Path(path), m, torch_dtype)
    else:
        check_weights(path, m.allow_pickle)
        config = load_pretrained_config(path, m)
        kind = heads.task_of_model(config)
        tokenizer = load_tokenizer_for(path, m)
        kwargs = load_kwargs(m, dtype=torch_dtype)
        head = heads.head_class(kind)
        try:
            model = head.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load model '{path}': {first_line(err)}") from None
        check_vocab(model, tokenizer)
    model.to(dev)
    model.eval()
    return model, tokenizer, kind


def load_adapter(local: Path, m: ModelSection, torch_dtype=None):
    """Base model + LoRA adapter through peft, under the same rules as any model: the adapter's
    base is checked like `--model` (safetensors only unless allow_pickle, remote code only if trusted)."""
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{local} holds a LoRA adapter; install peft (pip install 'llmcli[peft]') or use its merged/ model") from None
    adapter, base = _read_adapter(local)
    if not (local / "adapter_model.safetensors").exists() and (local / "adapter_model.bin").exists() and not m.allow_pickle:
        raise ConfigError(f"{local} has only pickle adapter weights (adapter_model.bin); set model.allow_pickle=true if you trust the file")
    check_weights(base, m.allow_pickle)
    kind = Task.CLASSIFICATION if adapter.get("task_type") == "SEQ_CLS" else Task.CAUSAL_LM
    # the base with the head the run trained (its size and labels); the adapter then brings the head's
    # weights and any layer the base did not hold (modules_to_save)
    config = _adapter_model_config(local, adapter, base, m)
    try:
        base_model = heads.head_class(kind).from_pretrained(base, **load_kwargs(m, config=config, dtype=torch_dtype),
                                                            ignore_mismatched_sizes=kind == Task.CLASSIFICATION)
        model = peft.PeftModel.from_pretrained(base_model, str(local))
    except (OSError, ValueError, RuntimeError) as err:
        raise ConfigError(f"could not load the LoRA adapter in {local} or its base model '{base}': {first_line(err)}") from None
    return model, load_tokenizer_for(str(local), m), kind
