"""`llmcli pretrain`: a causal LM (GPT-2 style) or masked LM (BERT style), from scratch or not.

    llmcli pretrain --config configs/shakespeare.yaml
    llmcli pretrain --config configs/wikitext.yaml --set training.max_steps=100 --output-dir runs/wt

From scratch (no `model.model_name_or_path`), the model is `model.model_type` with
`model.config_overrides`, and without `model.tokenizer_name` a tokenizer is trained on the
training text first. The text is tokenized, concatenated and cut into `data.block_size` blocks.
"""

from __future__ import annotations

from typing import Any

from llmcli import console, tasks
from llmcli.config import Config
from llmcli.data.sources import RawData, source_fingerprint
from llmcli.errors import ConfigError
from llmcli.models import build, heads, load
from llmcli.train.rundir import RunDir, output_dir_of


def run(cfg: Config, resume: bool = True, overwrite: bool = False, dry_run: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """The whole command; `callbacks` are extra TrainerCallbacks (sweeps add a pruning one)."""
    output_dir_of(cfg)  # a missing output_dir is a config error before anything else
    model_path = load.resolve_model_path(cfg.model.model_name_or_path) if cfg.model.model_name_or_path else None
    if model_path:
        load.check_weights(model_path, cfg.model.allow_pickle)  # before the run dir: a dir without weights writes nothing
    model_type = load.load_pretrained_config(model_path, cfg.model).model_type if model_path else cfg.model.model_type
    task, fmt = tasks.resolve_task(cfg.task, "pretrain", lambda: heads.default_lm_task(model_type))
    tasks.check_batching(cfg, fmt)
    if model_path is None:
        build.scratch_config(cfg.model)  # a bad architecture override fails before anything is written
    source_fingerprint(cfg.data)  # resolves data files now, so a missing one fails before anything else
    if cfg.data.streaming and not (cfg.model.tokenizer_name or model_path):
        raise ConfigError("data.streaming=true needs model.tokenizer_name (a tokenizer is not trained on a stream)")
    from llmcli.train import fit

    if dry_run:
        return fit.dry_run(cfg, "pretrain", task, model_path)

    with RunDir(cfg, resume, overwrite, protect=model_path, task=task) as run_dir:
        if run_dir.finished is not None:
            return run_dir.finished
        raw = RawData(cfg.data, cfg.training.seed)
        tokenizer, model, datasets, collator = fit.prepare(cfg, task, fmt, raw, model_path)
        summary = fit.fit(run_dir, cfg, model, tokenizer, datasets, collator, task, callbacks=callbacks)
    console.summary_table("pretrain", cfg.training.output_dir, summary)
    return summary
