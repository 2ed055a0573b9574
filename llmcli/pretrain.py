"""`llmcli pretrain`: a causal LM (GPT-2 style) or masked LM (BERT style), from scratch or not.

    llmcli pretrain --config configs/shakespeare.yaml
    llmcli pretrain --config configs/wikitext.yaml --set training.max_steps=100 --output-dir runs/wt

From scratch (no `model.model_name_or_path`), the model is `model.model_type` with
`model.config_overrides`, and without `model.tokenizer_name` a tokenizer is trained on the
training text first. The text is tokenized, concatenated and cut into `data.block_size` blocks.
"""

from __future__ import annotations

from typing import Any

from llmcli import console, data, modeling
from llmcli.config import Config
from llmcli.errors import ConfigError


def run(cfg: Config, resume: bool = True, overwrite: bool = False, dry_run: bool = False, callbacks: tuple = ()) -> dict[str, Any]:
    """The whole command; `callbacks` are extra TrainerCallbacks (sweeps add a pruning one)."""
    from llmcli import training

    training.output_dir_of(cfg)  # a missing output_dir is a config error before anything else
    model_path = modeling.resolve_model_path(cfg.model.model_name_or_path) if cfg.model.model_name_or_path else None
    model_type = modeling.load_pretrained_config(model_path, cfg.model).model_type if model_path else cfg.model.model_type
    task = modeling.lm_task(cfg, model_type)
    data.source_fingerprint(cfg.data)  # resolves data files now, so a missing one fails before anything else
    if cfg.data.streaming and not (cfg.model.tokenizer_name or model_path):
        raise ConfigError("data.streaming=true needs model.tokenizer_name (a tokenizer is not trained on a stream)")
    if dry_run:
        return training.dry_run(cfg, "pretrain", task, model_path)

    with training.RunDir(cfg, resume, overwrite) as run_dir:
        import transformers

        seed = training.seed_of(cfg)
        transformers.set_seed(seed)
        masked = task == "masked-lm"
        tokenizer = modeling.load_tokenizer(cfg, model_path, masked=masked)
        model = modeling.build_model(cfg, task, tokenizer, model_path)
        datasets, collator, about = training.lm_data(cfg, model, tokenizer, masked, seed)
        console.info(f"{task} on {about}")
        return training.fit(run_dir, cfg, model, tokenizer, datasets, collator, task, callbacks=callbacks)
