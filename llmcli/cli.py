"""The `llmcli` command line: a thin Typer layer over one module per command.

Nothing heavy is imported here: each command imports its module (and torch/transformers) inside
its body, so `llmcli --help` stays fast. Errors the user can fix become one line on stderr with
the exit codes in `llmcli.errors`; `--debug` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from llmcli import __version__, console
from llmcli.errors import EXIT_FAILURE, EXIT_SIGINT, EXIT_SIGTERM, ConfigError, LlmcliError

app = typer.Typer(name="llmcli", help="Train, fine-tune, generate with and evaluate GPT-2 and BERT style models: one command, one YAML file.",
                  no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False, rich_markup_mode=None)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a config key: --set training.max_steps=20 (repeatable).")]
OutputDirOpt = Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Shortcut for --set training.output_dir=DIR.")]
ResumeOpt = Annotated[bool, typer.Option("--resume/--no-resume", help="Resume from the newest complete checkpoint in the output dir.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Start over in an output dir that holds a previous run (deletes it).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Validate config, data and model, print the plan, train nothing.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing on stderr but errors.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks and library logs.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Hub id, model dir or llmcli run dir (overrides model.model_name_or_path).")]
CheckpointOpt = Annotated[Optional[str], typer.Option("--checkpoint", help="With a run dir: 'latest' or a step number instead of the final model.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="cuda, cuda:1, mps or cpu (default: the best available).")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32 (default: bf16 on CUDA, else fp32).")]
RuntimeOpt = Annotated[Optional[str], typer.Option("--runtime", help="Classifiers: auto (model.onnx from `llmcli export` when present), torch or onnx.")]


class TextOrJsonl(str, Enum):
    text, jsonl = "text", "jsonl"


def _version(value: bool):
    if value:
        typer.echo(f"llmcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
):
    """Train, fine-tune, generate with and evaluate GPT-2 and BERT style models."""


def _invoke(fn: Callable[[], object], quiet: bool, debug: bool, on_exit: Callable[[int], None] | None = None):
    """Run a command body; map errors to one-line messages and exit codes (`on_exit(code)` runs last)."""
    # under accelerate/torchrun only the main process talks; errors still print on every rank
    from llmcli.dist import is_main_process, leave_process_group  # stdlib-only module: --help stays fast

    console.configure(quiet=quiet or not is_main_process(), debug=debug)  # and quiets the libraries' logs unless debug
    code = EXIT_FAILURE
    try:
        fn()
        code = 0
        leave_process_group()
    except LlmcliError as err:
        if debug:
            import traceback

            traceback.print_exc()
        console.error(str(err))
        code = err.exit_code
    except KeyboardInterrupt:
        console.error("interrupted")
        code = EXIT_SIGINT
    except typer.Exit as done:
        code = done.exit_code
    except Exception as err:  # a bug or a library failure: still one line unless --debug
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:500]
        console.error(f"{type(err).__name__}: {first} (rerun with --debug for the traceback)")
    finally:
        if os.environ.get("LLMCLI_EXIT_FILE"):  # a worker of `--num-processes`: tell the parent how it ended
            from llmcli.train.launch import write_exit_code

            write_exit_code(code)
        if on_exit is not None:
            on_exit(code)
    if code:
        raise typer.Exit(code)


def _flag_values(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags given, as typer typed them, for `load_config(values=)`: a path or name is taken as
    is, never parsed as YAML (`-o 2024`, `--text-column true`, `--data null` stay strings)."""
    return {key: value for key, value in flags.items() if value is not None}


def _train_command(command: str, config, sets, output_dir, resume, overwrite, dry_run, quiet, debug, flags=None, merge=None):
    run: dict = {}

    def body():
        from llmcli.config import load_config
        from llmcli.train import finetune, launch, pretrain

        module = {"pretrain": pretrain, "finetune": finetune}[command]
        cfg = load_config(config, list(sets or []), command=command,
                          values=_flag_values({"training.output_dir": output_dir, **(flags or {})}))
        if merge is not None:  # a LoRA option: it must not turn LoRA on for a full fine-tune
            if cfg.peft is None:
                raise ConfigError(f"--{'' if merge else 'no-'}merge applies to LoRA runs; this config has no peft: section (add one, or --set peft=true)")
            cfg.peft = cfg.peft.model_copy(update={"merge": merge})
        if launch.wanted(cfg) and not dry_run:
            raise typer.Exit(launch.relaunch(cfg))
        run["dir"] = None if dry_run else cfg.training.output_dir
        run["summary"] = module.run(cfg, resume=resume, overwrite=overwrite, dry_run=dry_run)

    def final_line(code: int) -> None:
        """`--quiet` runs end with one stderr line for cron mail: `llmcli: pretrain runs/x finished step=600 eval_loss=1.47`.
        Usage, data and lock errors (2, 4, 75) trained nothing: their own error line says it all."""
        from llmcli.dist import is_main_process

        status = {0: "finished", EXIT_SIGINT: "interrupted", EXIT_SIGTERM: "interrupted", EXIT_FAILURE: "failed"}.get(code)
        if quiet and run.get("dir") and status and is_main_process():
            from llmcli.report.runinfo import final_line as line

            print(line(command, run["dir"], status, run.get("summary")), file=sys.stderr, flush=True)

    _invoke(body, quiet, debug, on_exit=final_line)


@app.command()
def pretrain(
    config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, resume: ResumeOpt = True,
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", help="Processes to launch through accelerate (one per GPU).")] = None,
):
    """Pretrain a causal LM (GPT-2 style) or masked LM (BERT style), from scratch or from a checkpoint."""
    _train_command("pretrain", config, set_, output_dir, resume, overwrite, dry_run, quiet, debug,
                   {"launch.num_processes": num_processes})


@app.command()
def finetune(
    config: ConfigOpt = None, set_: SetOpt = None, output_dir: OutputDirOpt = None, resume: ResumeOpt = True,
    overwrite: OverwriteOpt = False, dry_run: DryRunOpt = False, quiet: QuietOpt = False, debug: DebugOpt = False,
    model: ModelOpt = None,
    merge: Annotated[Optional[bool], typer.Option("--merge/--no-merge", help="With LoRA: also save a merged full model in merged/.")] = None,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", help="Processes to launch through accelerate (one per GPU).")] = None,
):
    """Fine-tune a pretrained model: sequence classification or causal LM (optionally with LoRA)."""
    _train_command("finetune", config, set_, output_dir, resume, overwrite, dry_run, quiet, debug,
                   {"model.model_name_or_path": model, "launch.num_processes": num_processes}, merge=merge)


@app.command()
def generate(
    model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable); \\n escapes allowed.")] = None,
    input_: Annotated[Optional[str], typer.Option("--input", "-i", help="File of prompts, one per line ('-' = stdin).")] = None,
    input_format: Annotated[TextOrJsonl, typer.Option("--input-format", help="text: one prompt per line; jsonl: objects with a 'prompt' field.")] = TextOrJsonl.text,
    format_: Annotated[TextOrJsonl, typer.Option("--format", "-f", help="text: one completion per line; jsonl: one object per prompt.")] = TextOrJsonl.text,
    output: Annotated[Optional[str], typer.Option("--output", help="Write results here instead of stdout.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Tokens to generate per prompt.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", "-t", help="0 = greedy.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Top-k sampling (0 = off).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass.")] = None,
    repetition_penalty: Annotated[Optional[float], typer.Option("--repetition-penalty", help="> 1 discourages repeats.")] = None,
    num_return_sequences: Annotated[Optional[int], typer.Option("--num-return-sequences", "-n", help="Completions per prompt.")] = None,
    do_sample: Annotated[Optional[bool], typer.Option("--do-sample/--greedy", help="Force sampling or greedy decoding.")] = None,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Cut completions at this string (repeatable).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Prompts per batch.")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, runtime: RuntimeOpt = None, quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Generate text from a trained model (or label text with a classifier); prompts from flags, files or stdin."""

    def body():
        from llmcli.config import load_config
        from llmcli.generate import generate as gen

        flags = {
            "model.model_name_or_path": model, "generation.max_new_tokens": max_new_tokens, "generation.temperature": temperature,
            "generation.top_k": top_k, "generation.top_p": top_p, "generation.repetition_penalty": repetition_penalty,
            "generation.num_return_sequences": num_return_sequences, "generation.do_sample": do_sample,
            "generation.seed": seed, "generation.batch_size": batch_size, "model.runtime": runtime,
        }
        cfg = load_config(config, list(set_ or []), command="generate",
                          values=_flag_values({**flags, "generation.stop": list(stop) if stop else None}))
        gen.run(cfg, prompts=prompt, input_path=input_, input_format=input_format.value, output_format=format_.value,
                output_path=output, checkpoint=checkpoint, device=device, dtype=dtype)

    _invoke(body, quiet, debug)


@app.command()
def serve(
    model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Address to bind (default 127.0.0.1; 0.0.0.0 needs an API key to be safe).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="TCP port (default 8000; 0 = any free port).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (or set LLMCLI_API_KEY).")] = None,
    model_name: Annotated[Optional[str], typer.Option("--model-name", help="The model id clients send (default: the model path's last part).")] = None,
    max_batch_size: Annotated[Optional[int], typer.Option("--max-batch-size", help="Most rows in the running batch (default 64).")] = None,
    max_wait_ms: Annotated[Optional[float], typer.Option("--max-wait-ms", help="With nothing running, how long the first request waits for others to start with it (default 10).")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, runtime: RuntimeOpt = None, quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Serve a model over the OpenAI API (completions, chat, models) plus /v1/classify, /health and /metrics."""

    def body():
        from llmcli.config import load_config
        from llmcli.serve import serve as serve_module

        flags = {"model.model_name_or_path": model, "serve.host": host, "serve.port": port, "serve.api_key": api_key,
                 "serve.model_name": model_name, "serve.max_batch_size": max_batch_size, "serve.max_wait_ms": max_wait_ms,
                 "model.runtime": runtime}
        cfg = load_config(config, list(set_ or []), command="serve", values=_flag_values(flags))
        serve_module.run(cfg, checkpoint=checkpoint, device=device, dtype=dtype)

    _invoke(body, quiet, debug)


@app.command("eval")
def eval_(
    model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Evaluation file (.txt/.raw, .jsonl, .csv/.tsv, .parquet).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="Hub dataset id (e.g. wikitext).")] = None,
    dataset_config: Annotated[Optional[str], typer.Option("--dataset-config", help="Hub dataset config (e.g. wikitext-2-raw-v1).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Hub dataset split (default: test).")] = None,
    max_length: Annotated[Optional[int], typer.Option("--max-length", help="Sliding-window length (default: the model's context).")] = None,
    stride: Annotated[Optional[int], typer.Option("--stride", help="Tokens scored per window (default: max-length).")] = None,
    text_column: Annotated[Optional[str], typer.Option("--text-column", help="Text column of a dataset.")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Label column (classifiers).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Windows/examples per forward pass.")] = None,
    add_bos: Annotated[Optional[bool], typer.Option("--add-bos/--no-add-bos", help="Prepend BOS to the evaluation text.")] = None,
    per_document: Annotated[Optional[bool], typer.Option("--per-document/--whole-text", help="Score each document separately (lm-eval style).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")] = False,
    output: Annotated[Optional[str], typer.Option("--output", help="Also write the JSON result to this file.")] = None,
    errors: Annotated[Optional[str], typer.Option("--errors", help="Classifiers: write misclassified examples here as JSONL.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="metric=value: exit 3 if the metric is below (repeatable).")] = None,
    fail_over: Annotated[Optional[list[str]], typer.Option("--fail-over", help="metric=value: exit 3 if the metric is above (repeatable).")] = None,
    device: DeviceOpt = None, dtype: DtypeOpt = None, runtime: RuntimeOpt = None, quiet: QuietOpt = False, debug: DebugOpt = False,
    num_processes: Annotated[Optional[int], typer.Option("--num-processes", help="Processes to launch through accelerate (one per GPU); the work is split across them.")] = None,
):
    """Evaluate a model: perplexity and bits per byte for LMs, accuracy/precision/recall/F1 for classifiers."""

    def body():
        from llmcli.config import load_config
        from llmcli.train import launch

        flags = {
            "model.model_name_or_path": model, "data.validation_file": data, "data.dataset_name": dataset,
            "data.dataset_config_name": dataset_config, "eval.split": split, "eval.max_length": max_length, "eval.stride": stride,
            "data.text_column": text_column, "data.label_column": label_column, "eval.batch_size": batch_size,
            "eval.add_bos": add_bos, "eval.per_document": per_document, "launch.num_processes": num_processes,
            "model.runtime": runtime,
        }
        sets = list(set_ or [])
        if data is not None:
            sets += ["data.dataset_name=null", "data.train_file=null"]
        if dataset is not None:
            sets += ["data.train_file=null", "data.validation_file=null"]
        sets += [f"eval.fail_under.{g}" for g in fail_under or []] + [f"eval.fail_over.{g}" for g in fail_over or []]
        cfg = load_config(config, sets, command="eval", values=_flag_values(flags))
        if launch.wanted(cfg):
            raise typer.Exit(launch.relaunch(cfg))  # before torch is imported: the launcher stays light
        from llmcli.evaluate import evaluate

        evaluate.run(cfg, checkpoint=checkpoint, as_json=json_, output_path=output, errors_path=errors, device=device, dtype=dtype)

    _invoke(body, quiet or json_, debug)


@app.command()
def export(
    model: ModelOpt = None, config: ConfigOpt = None, set_: SetOpt = None, checkpoint: CheckpointOpt = None,
    format_: Annotated[str, typer.Option("--format", help="onnx: a classifier's model.onnx beside its weights; hf: a LoRA run merged into a full model dir.")] = "onnx",
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="onnx: rows to check the export on (default: the run's validation data).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="hf: the model dir to write (default: RUN/merged).")] = None,
    quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Export a classifier to ONNX (checked against the model before it is written), or merge a LoRA run into a full model."""

    def body():
        from llmcli.config import load_config
        from llmcli.export import export as export_module

        cfg = load_config(config, list(set_ or []), command="export", values=_flag_values({"model.model_name_or_path": model}))
        export_module.run(cfg, fmt=format_, output=output, checkpoint=checkpoint, data_path=data)

    _invoke(body, quiet, debug)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="Run dirs, sweep dirs (their run dirs) or globs ('runs/*').", show_default=False)],
    json_: Annotated[bool, typer.Option("--json", help='Print {"runs": [{"path", "status", "step", ...}]} on stdout and nothing else.')] = False,
    plot: Annotated[bool, typer.Option("--plot", help="Also draw the loss curves in the terminal (plotext).")] = False,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write a PNG overlaying the runs' curves (e.g. compare.png).")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until no run is running (Ctrl-C exits 130).")] = False,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Seconds between --watch refreshes.")] = 10.0,
    quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Compare training runs: model, size, steps, tokens, time, final/best metrics and status (no torch needed)."""

    def body():
        from llmcli.report import report as rep

        code = rep.run(runs, as_json=json_, plot=plot, watch=watch, interval=interval, output=output)
        if code:
            raise typer.Exit(code)

    _invoke(body, quiet or json_, debug)


@app.command()
def sweep(
    config: ConfigOpt = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override a key of every trial's base config (repeatable).")] = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="The sweep dir (instead of the sweep file's output_dir).")] = None,
    storage: Annotated[Optional[str], typer.Option("--storage", help="Optuna RDB URL shared by workers (default sqlite:///<sweep dir>/study.db).")] = None,
    json_: Annotated[bool, typer.Option("--json", help="Print the best trial as one JSON object on stdout and nothing else.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the sweep file and its base config, print the plan, run nothing.")] = False,
    quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Search hyper-parameters with Optuna; every trial is an ordinary, resumable finetune/pretrain run."""
    done: dict = {}

    def body():
        from llmcli.sweep.schema import load_sweep_config

        spec = load_sweep_config(config, list(set_ or []))
        from llmcli.sweep import sweep as sweep_module

        if dry_run:
            sweep_module.dry_run(spec, overrides=list(set_ or []), output_dir=output_dir, storage=storage)
            return
        done["dir"] = sweep_module.sweep_dir_of(spec, output_dir)
        done["best"] = sweep_module.run(spec, overrides=list(set_ or []), output_dir=output_dir, storage=storage, as_json=json_)

    def final_line(code: int) -> None:
        """`--quiet`: one stderr line for cron mail, `llmcli: sweep runs/s finished best=trial 7 eval_accuracy=0.8131`."""
        status = {0: "finished", EXIT_SIGINT: "interrupted", EXIT_SIGTERM: "interrupted", EXIT_FAILURE: "failed"}.get(code)
        if quiet and not json_ and done.get("dir") and status:
            best = done.get("best") or {}
            shown = f" best=trial {best['trial']} {best['metric']}={best['value']:.6g}" if best else ""
            if best.get("confirm"):
                shown += f" mean={best['confirm']['mean']:.6g} seeds={best['confirm']['n']}"
            if best.get("test"):
                shown += f" test_{best['test']['metric']}={best['test']['mean']:.6g}"
            print(f"llmcli: sweep {done['dir']} {status}{shown}", file=sys.stderr, flush=True)

    _invoke(body, quiet or json_, debug, on_exit=final_line)


class InitCommand(str, Enum):
    pretrain = "pretrain"
    finetune = "finetune"
    generate = "generate"
    eval = "eval"
    serve = "serve"
    sweep = "sweep"


@app.command()
def init(
    command: Annotated[InitCommand, typer.Argument(help="The command the config is for.", show_default=False)],
    from_: Annotated[Optional[Path], typer.Option("--from", help="Take the values from this config (the rest: defaults).")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write the YAML to this file instead of stdout.")] = None,
    quiet: QuietOpt = False, debug: DebugOpt = False,
):
    """Print a commented config holding every key a command reads, with its default and description."""

    def body():
        from llmcli.report import init as init_module

        init_module.run(command.value, from_path=str(from_) if from_ is not None else None, output=output)

    _invoke(body, quiet, debug)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
