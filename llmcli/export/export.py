"""`llmcli export`: a classifier as ONNX beside its weights, or a LoRA run as a full model dir.

    llmcli export --model runs/sst2-minilm                        # runs/sst2-minilm/model.onnx
    llmcli export --model runs/sst2-minilm --data dev.tsv          # checked on this file's rows
    llmcli export --model runs/sst2-lora --format hf -o sst2-full  # LoRA merged into a full model

`--format onnx` (classifiers): torch.onnx's exporter writes the model to a temporary file, then
ONNX Runtime and the torch model label the check rows (`--data`, else the run's validation data
from its config.yaml): the export is kept, as `model.onnx` with `model.onnx.json` (the check's
numbers, the weights it came from), only if every label is identical and no class probability
differs by more than 1e-4 (a reward model: no score by more than 1e-4 of max(1, |score|)).
Otherwise it is exit 1 and nothing is written. `generate` and `eval`
then label with it (`models/onnx.py`).

`--format hf` (LoRA run dirs): the adapter folded into its base, saved with the tokenizer, the
classifier head and the labels: a model dir that loads without peft.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmcli import console
from llmcli.config import Config, load_config
from llmcli.errors import ConfigError, LlmcliError
from llmcli.files import write_json_atomic
from llmcli.models import load, onnx
from llmcli.models.heads import is_reward_model
from llmcli.tasks import Task

MAX_DIFF = 1e-4  # a class probability's, or a reward model's score's relative to at least 1
FORMATS = ("onnx", "hf")


def run(cfg: Config, fmt: str = "onnx", output: str | None = None, checkpoint: str | None = None,
        data_path: str | None = None) -> dict[str, Any]:
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not cfg.model.model_name_or_path:
        raise ConfigError("export needs a model: pass --model (a model dir or llmcli run dir)")
    path = load.resolve_model_path(cfg.model.model_name_or_path, checkpoint)
    if not Path(path).is_dir():
        raise ConfigError(f"export writes beside a local model; {path} is not a directory")
    return _hf(cfg, Path(path), output) if fmt == "hf" else _onnx(cfg, Path(path), data_path)


def _onnx(cfg: Config, path: Path, data_path: str | None) -> dict[str, Any]:
    import torch

    if not (path / "model.safetensors").exists():
        raise ConfigError(f"{path} holds no model.safetensors (a LoRA run: export --format hf first, or use its merged/)")
    model, tokenizer, kind = load.load_for_inference(str(path), cfg.model.model_copy(update={"runtime": "torch"}), "cpu", None)
    if kind != Task.CLASSIFICATION:
        raise ConfigError(f"{path} is a {kind} model; --format onnx exports sequence classifiers (ONNX Runtime serves them)")
    onnx.need_onnxruntime()
    texts, source = _check_rows(cfg, path, data_path)
    target, temporary = path / onnx.ONNX_FILE, path / f".{onnx.ONNX_FILE}.tmp"
    try:
        console.info(f"exporting {path} to ONNX")
        onnx.export(model, tokenizer, temporary)
        session = onnx.OnnxClassifier(temporary, model.config)
        reward = is_reward_model(model.config)  # its score is the logit: a softmax over its one output is always 1
        key, what = ("max_score_diff", "score difference (relative, to at least 1)") if reward else ("max_prob_diff", "probability difference")
        labels_differ, max_diff = 0, 0.0
        tokenizer.padding_side = "right"
        for b in range(0, len(texts), 32):
            enc = tokenizer(texts[b : b + 32], padding=True, truncation=True, max_length=cfg.data.max_seq_length, return_tensors="pt")
            with torch.inference_mode():
                want = model(**enc).logits.float()
            got = session(**enc).logits.float()
            if reward:
                diff = (want[:, 0] - got[:, 0]).abs() / want[:, 0].abs().clamp(min=1)
            else:
                want, got = torch.softmax(want, -1), torch.softmax(got, -1)
                labels_differ += int((want.argmax(-1) != got.argmax(-1)).sum())
                diff = (want - got).abs()
            max_diff = max(max_diff, float(diff.max()))
        check = {"rows": len(texts), "source": source, "labels_differ": labels_differ, key: max_diff}
        if labels_differ or max_diff > MAX_DIFF:
            labels = "" if reward else f"{labels_differ} of {len(texts)} labels differ, "
            raise LlmcliError(f"the ONNX export disagrees with the model on {source}: {labels}largest {what} {max_diff:.2e} "
                               f"(limit {MAX_DIFF:g}); nothing written")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    write_json_atomic(path / onnx.RECORD_FILE, {"format": onnx.RECORD_FORMAT, "source": onnx.weights_fingerprint(path), "check": check})
    console.info(f"wrote {target} ({target.stat().st_size / 2**20:.1f} MiB): {len(texts)} rows of {source} "
                 f"{'scored' if reward else 'labelled identically'}, largest {what} {max_diff:.1e}")
    return {"onnx": str(target), **check}


def _check_rows(cfg: Config, path: Path, data_path: str | None) -> tuple[list[str], str]:
    """The texts the export is checked on: --data, else the run's validation data (its config.yaml)."""
    from llmcli.data import tokenized

    data = cfg.data
    if data_path:
        data = data.model_copy(update={"validation_file": data_path, "train_file": None, "dataset_name": None})
    else:
        run_config = next((p / "config.yaml" for p in (path, path.parent) if (p / "config.yaml").exists()), None)
        data = load_config(run_config).data if run_config else None
        if data is None or not data.validation_file:
            raise ConfigError(f"no rows to check the export on: {path} has no run config with data.validation_file; pass --data FILE")
    ds = tokenized.load_eval_split(data, "validation")
    text_col, pair_col, _ = tokenized.classification_columns(ds, data)
    if pair_col:
        raise ConfigError("--format onnx checks single-text classifiers; this data has a text pair column")
    return [str(t) for t in ds[text_col]], str(data.validation_file)


def _hf(cfg: Config, path: Path, output: str | None) -> dict[str, Any]:
    """A LoRA run dir's adapter merged into a full model dir (head, labels and tokenizer kept)."""
    if not (path / "adapter_config.json").exists():
        raise ConfigError(f"{path} holds a full model already (no adapter_config.json); --format hf merges LoRA run dirs")
    out = Path(output) if output else path / "merged"
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; pass -o to another directory")
    model, tokenizer, kind = load.load_adapter(path, cfg.model)
    merged = model.merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    console.info(f"wrote {out}: {kind} model with the adapter merged ({sum(p.numel() for p in merged.parameters()):,} parameters)")
    return {"hf": str(out), "task": str(kind)}
