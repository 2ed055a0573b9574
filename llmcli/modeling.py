"""Every model and tokenizer llmcli uses is built or loaded here.

- `resolve_model_path` turns a hub id, a model dir or an llmcli run dir (final model or a
  checkpoint) into something `from_pretrained` takes.
- `load_tokenizer` loads a tokenizer, or trains one on the training text (byte-level BPE for
  GPT-2 style, WordPiece for BERT style), cached like tokenized data.
- `build_model` makes a from-scratch model from `model_type` + `config_overrides`, or loads a
  pretrained one (safetensors only unless `allow_pickle`; remote code only if trusted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.config import Config, ModelSection
from llmcli.errors import ConfigError
from llmcli.runs import holds_finished_run, latest_checkpoint, list_checkpoints, main_process_first, publish_dir

GPT_SPECIAL = "<|endoftext|>"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


# --------------------------------------------------------------------------------------------
# Where a model lives


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ('gpt2', 'org/model'): ./x, /x, ~/x, a/b/c, or runs/x when runs/ exists."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and os.path.isdir(name.split("/", 1)[0]))


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
    if _looks_like_path(name_or_path):
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

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except Exception as err:
        raise ConfigError(f"could not load the model config of '{path}': {_first_line(err)}") from None


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def is_masked_lm_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def lm_task(cfg: Config, model_type: str) -> str:
    """The pretraining objective: explicit `task`, else masked-lm for BERT-style encoders."""
    if cfg.task in ("causal-lm", "masked-lm"):
        return cfg.task
    if cfg.task == "classification":
        raise ConfigError("task: classification is for `llmcli finetune`; pretrain takes causal-lm or masked-lm")
    return "masked-lm" if is_masked_lm_type(model_type) else "causal-lm"


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


def _position_offset(config) -> int:
    model_type = getattr(config, "model_type", None)
    if model_type not in OFFSET_POSITION_TYPES:
        return 0
    if model_type == "esm" and getattr(config, "position_embedding_type", "absolute") != "absolute":
        return 0  # ESM-2's rotary positions use no table
    padding_idx = 1 if model_type == "mpnet" else getattr(config, "pad_token_id", None)  # MPNet hard-codes 1
    return (1 if padding_idx is None else padding_idx) + 1


# --------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizer(cfg: Config, model_path: str | None, masked: bool = False):
    """The configured tokenizer, the model's own, or one trained here on the training text."""
    name = cfg.model.tokenizer_name or model_path
    if name is None:
        return train_tokenizer(cfg, masked)
    return load_tokenizer_for(name, cfg.model)


def _load_tokenizer(name: str, m: ModelSection):
    from transformers import AutoTokenizer

    path = Path(os.path.expanduser(name))
    if not path.exists() and _looks_like_path(name):
        raise ConfigError(f"model.tokenizer_name: tokenizer path not found: {name}")
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=m.trust_remote_code, revision=m.revision)
    except Exception as err:
        if path.is_dir():  # bare vocab files without a tokenizer_config.json
            if (path / "vocab.json").exists() and (path / "merges.txt").exists():
                from transformers import GPT2Tokenizer

                return GPT2Tokenizer.from_pretrained(str(path))
            if (path / "vocab.txt").exists():
                from transformers import BertTokenizer

                return BertTokenizer.from_pretrained(str(path))
        raise ConfigError(f"could not load tokenizer '{name}': {_first_line(err)}") from None


def train_tokenizer(cfg: Config, masked: bool):
    """Train a byte-level BPE (causal) or WordPiece (masked) tokenizer on the training text.

    Cached by training data + vocab size + kind, so a rerun reuses it.
    """
    from llmcli import data as data_mod

    kind = "wordpiece" if masked else "bpe"
    parts = {"source": data_mod.source_fingerprint(cfg.data), "vocab_size": cfg.model.vocab_size, "kind": kind,
             "text_column": cfg.data.text_column, "seed": cfg.training.model_dump().get("seed", 42)}
    final = data_mod.cache_entry(cfg.data, "tokenizers", parts)
    with main_process_first():  # under accelerate, rank 0 trains it and the others read the cache
        return _train_or_load_tokenizer(cfg, kind, parts, final)


def _train_or_load_tokenizer(cfg: Config, kind: str, parts: dict, final: Path):
    from llmcli import data as data_mod

    if (final / "llmcli-complete").exists():
        console.info(f"tokenizer cache hit: {final}")
        return _wrap_tokenizer(final, kind)

    console.info(f"training a {kind} tokenizer (vocab_size={cfg.model.vocab_size}) on the training text")
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(vocab_size=cfg.model.vocab_size, special_tokens=[GPT_SPECIAL],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=cfg.model.vocab_size, special_tokens=BERT_SPECIALS, show_progress=False)
    tok.train_from_iterator(data_mod.training_texts(cfg.data), trainer=trainer)
    if kind == "wordpiece":
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    publish_dir(final, lambda tmp: tok.save(str(tmp / "tokenizer.json")), json.dumps(parts, default=str))
    return _wrap_tokenizer(final, kind)


def _wrap_tokenizer(folder: Path, kind: str):
    from transformers import PreTrainedTokenizerFast

    if kind == "bpe":
        return PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), bos_token=GPT_SPECIAL, eos_token=GPT_SPECIAL,
            unk_token=GPT_SPECIAL, pad_token=GPT_SPECIAL, model_max_length=1024,
        )
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
    )


# --------------------------------------------------------------------------------------------
# Models


def build_model(cfg: Config, task: str, tokenizer, model_path: str | None, label_names: list[str] | None = None):
    """From scratch (no model path) or from_pretrained, with the head `task` needs."""
    from transformers import AutoConfig

    m = cfg.model
    head = _auto_class(task)
    if model_path is None:
        try:
            config = AutoConfig.for_model(m.model_type)
        except ValueError:
            raise ConfigError(f"model.model_type: unknown model type '{m.model_type}' (e.g. gpt2, bert, llama)") from None
        _apply_overrides(config, m.config_overrides)
        vocab = max(len(tokenizer), max(tokenizer.get_vocab().values()) + 1)
        multiple = m.pad_vocab_to_multiple_of
        config.vocab_size = ((vocab + multiple - 1) // multiple) * multiple
        for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
            token_id = getattr(tokenizer, attr, None)
            if token_id is not None:
                setattr(config, attr, token_id)
        if task == "classification":
            _set_labels(config, label_names)
        if m.attn_implementation:
            config._attn_implementation = m.attn_implementation
        model = head.from_config(config)
        console.info(f"built {m.model_type} from scratch: {_count(model) / 1e6:.2f}M parameters, vocab {config.vocab_size} (tokenizer {vocab})")
        return model

    check_weights(model_path, m.allow_pickle)
    config = load_pretrained_config(model_path, m)
    if m.config_overrides:
        _apply_overrides(config, m.config_overrides)
    kwargs = _load_kwargs(m, config=config)
    if task == "classification":
        _set_labels(config, label_names)
        if config.pad_token_id is None and tokenizer.pad_token_id is not None:
            config.pad_token_id = tokenizer.pad_token_id  # GPT2ForSequenceClassification finds the last non-pad token
    try:
        model = head.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"could not load model '{model_path}': {_first_line(err)}") from None
    check_vocab(model, tokenizer)
    return model


def _load_kwargs(m: ModelSection, **extra) -> dict[str, Any]:
    """from_pretrained options: safetensors only unless allow_pickle, remote code only if trusted."""
    kwargs: dict[str, Any] = {"trust_remote_code": m.trust_remote_code, "revision": m.revision, **extra}
    if not m.allow_pickle:
        kwargs["use_safetensors"] = True
    if m.attn_implementation:
        kwargs["attn_implementation"] = m.attn_implementation
    return kwargs


def _auto_class(task: str):
    import transformers

    return {
        "causal-lm": transformers.AutoModelForCausalLM,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "classification": transformers.AutoModelForSequenceClassification,
    }[task]


def _apply_overrides(config, overrides: dict[str, Any]) -> None:
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    for key, value in overrides.items():
        if key not in known:
            import difflib

            match = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ConfigError(f"unknown config key 'model.config_overrides.{key}' for {config.model_type}{hint}")
        setattr(config, key, value)


def _set_labels(config, label_names: list[str] | None) -> None:
    if not label_names:
        return
    config.num_labels = len(label_names)
    config.id2label = {i: name for i, name in enumerate(label_names)}
    config.label2id = {name: i for i, name in enumerate(label_names)}


def check_vocab(model, tokenizer) -> None:
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; "
            "use the model's own tokenizer (unset model.tokenizer_name)"
        )


def check_block_size(model_config, block_size: int) -> None:
    limit = context_length(model_config)
    if limit is not None and block_size > limit:
        raise ConfigError(f"data.block_size={block_size} is larger than the model's context ({limit} positions)")


def default_block_size(model_config, tokenizer) -> int:
    limit = context_length(model_config) or 1024
    return min(1024, limit, getattr(tokenizer, "model_max_length", limit) or limit)


def user_labels(config) -> dict[str, int] | None:
    """A pretrained classifier's label2id, unless it is the library's LABEL_0.. placeholder."""
    label2id = getattr(config, "label2id", None) or {}
    if not label2id or all(name.startswith("LABEL_") for name in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


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


def model_kind(config) -> str:
    """'classifier', 'masked-lm' or 'causal-lm', from the saved architecture."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    if any(a.endswith("ForMaskedLM") for a in archs):
        return "masked-lm"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    return "masked-lm" if is_masked_lm_type(config.model_type) else "causal-lm"


def load_for_inference(path: str, m: ModelSection, device: str | None = None, dtype: str | None = None):
    """(model in eval mode on its device, tokenizer, kind) for a model dir, run dir or hub id.

    A LoRA run dir loads its merged/ model when there is one, else base model + adapter.
    """
    local = Path(path)
    adapter_only = local.is_dir() and (local / "adapter_config.json").exists() and not (local / "config.json").exists()
    if adapter_only and (local / "merged" / "config.json").exists():
        path, local, adapter_only = str(local / "merged"), local / "merged", False
    dev, torch_dtype = pick_device(device, dtype)
    if adapter_only:
        model, tokenizer, kind = _load_adapter(local, m, torch_dtype)
    else:
        check_weights(path, m.allow_pickle)
        config = load_pretrained_config(path, m)
        kind = model_kind(config)
        tokenizer = load_tokenizer_for(path, m)
        kwargs = _load_kwargs(m, dtype=torch_dtype)
        head = _auto_class("classification" if kind == "classifier" else kind)
        try:
            model = head.from_pretrained(path, **kwargs)
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load model '{path}': {_first_line(err)}") from None
        check_vocab(model, tokenizer)
    model.to(dev)
    model.eval()
    return model, tokenizer, kind


def load_tokenizer_for(path: str, m: ModelSection):
    """`model.tokenizer_name`, else the tokenizer saved with the model at `path`."""
    tok = _load_tokenizer(m.tokenizer_name or path, m)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token  # GPT-2 has no pad token; batching needs one
    return tok


def _load_adapter(local: Path, m: ModelSection, torch_dtype):
    try:
        import peft
    except ImportError:
        raise ConfigError(f"{local} holds a LoRA adapter; install peft (pip install 'llmcli[peft]') or use its merged/ model") from None
    adapter = json.loads((local / "adapter_config.json").read_text())
    kind = "classifier" if adapter.get("task_type") == "SEQ_CLS" else "causal-lm"
    cls = peft.AutoPeftModelForSequenceClassification if kind == "classifier" else peft.AutoPeftModelForCausalLM
    model = cls.from_pretrained(str(local), dtype=torch_dtype)
    return model, load_tokenizer_for(str(local), m), kind
