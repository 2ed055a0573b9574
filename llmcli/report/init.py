"""`llmcli init`: a commented starting config holding every key a command reads.

    llmcli init pretrain > my.yaml                                   # defaults, each key with its description
    llmcli init finetune --from configs/sst2.yaml --output sst2.yaml # that config's values, every other key at its default

The keys, defaults and descriptions come from the schema (`llmcli/config.py`, the sections in
`COMMAND_SECTIONS`; `llmcli/sweep/schema.py` for a sweep file); `training:` lists llmcli's keys
and, commented out with the defaults of the installed `transformers.TrainingArguments` (read from
its source: no torch import), the arguments most runs touch. The output is a valid `--config` for
the command.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from llmcli import __version__, config
from llmcli.errors import ConfigError
from llmcli.sweep import schema

SECTION_HELP = {
    "model": "The model and its tokenizer.",
    "data": "Training and validation data (names as in Transformers' run_clm.py).",
    "training": "transformers.TrainingArguments fields (names unchanged, checked against it) plus llmcli's own keys.",
    "peft": "LoRA. null = full fine-tuning; `peft: true` or the block below (uncommented) turns it on.",
    "generation": "Defaults for `llmcli generate` (its flags override them).",
    "eval": "Defaults for `llmcli eval` (its flags override them).",
    "launch": "Several processes (GPUs) through accelerate.",
    "serve": "`llmcli serve` (its flags override them). Prefer the LLMCLI_API_KEY environment variable to api_key here.",
}

# TrainingArguments most runs set; listed commented out with the installed version's defaults.
COMMON_TRAINING_ARGUMENTS = (  # seed is a schema field (42), listed with the llmcli keys
    "max_steps", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "adam_beta1", "adam_beta2", "max_grad_norm", "optim", "logging_steps", "eval_strategy", "eval_steps",
    "save_strategy", "save_steps", "save_total_limit", "load_best_model_at_end", "metric_for_best_model",
    "greater_is_better", "bf16", "fp16", "tf32", "activation_checkpointing", "torch_compile",
    "dataloader_num_workers", "report_to", "run_name",
)
_LLMCLI_NOTES = {
    "bf16": "llmcli: unset = on where the GPU supports it.",
    "tf32": "llmcli: unset = on for Ampere and newer GPUs.",
    "report_to": "tensorboard, mlflow, trackio, wandb, ... (see README: Curves, reports and trackers).",
}
COMMANDS = ("pretrain", "finetune", "generate", "eval", "serve", "sweep")


def run(command: str, from_path: str | None = None, output: str | None = None) -> str:
    """Build the YAML for `command`; print it, or write it to `output`. Returns the text."""
    sections = _sections(command)
    if command == "sweep":  # a sweep file's required keys (base, command, search) have no value to show
        cfg = schema.load_sweep_config(from_path, []) if from_path else None
    elif not from_path:
        cfg = config.Config()
    else:
        cfg = config.load_config(from_path, command=command, check_training=False)
        if "training" in sections:
            cfg.training = config.TrainingSection.model_validate(_checked_training(cfg))
    text = render(command, cfg, sections, from_path, output)
    if output is None:
        print(text, end="")
        return text
    out = Path(output)
    if out.exists():
        raise ConfigError(f"--output {out}: the file exists; delete it or pick another name")
    if not out.parent.is_dir():
        raise ConfigError(f"--output {out}: directory {out.parent} does not exist")
    out.write_text(text, encoding="utf-8")
    from llmcli import console

    console.info(f"wrote {out}: run it with `llmcli {command} --config {out}`")
    return text


def _sections(command: str) -> tuple[str, ...]:
    if command == "sweep":
        return tuple(schema.SweepConfig.model_fields)  # a sweep file's keys
    if command not in config.COMMAND_SECTIONS:
        raise ConfigError(f"llmcli init {command}: unknown command; one of {', '.join(COMMANDS)}")
    return config.COMMAND_SECTIONS[command]


def render(command: str, cfg: BaseModel | None, sections: tuple[str, ...], from_path: str | None, output: str | None) -> str:
    values = cfg.model_dump(mode="json") if cfg is not None else {}  # no config: every key at its default
    source = f"Values from {from_path}; every other key at its default." if from_path else "Keys left at their default can be deleted."
    lines = [
        f"# llmcli {command} --config {output or command + '.yaml'}",
        f"# Every key `llmcli {command}` reads, with its description and default (the schema of llmcli {__version__},",
        f"# written by `llmcli init {command}`). {source}",
    ]
    for section in sections:
        field, owner = _find_field(section)
        if field is None:
            continue
        lines.append("")
        sub = _submodel(field.annotation)
        value = values[section] if section in values else _default(field)
        if section == "training":
            lines += _training(cfg)
        elif section == "search":  # a mapping of config keys to search spaces, not one space
            lines += _comment(_describe(field), 0)
            lines += ["search:", *(line for k, v in value.items() for line in _dump(k, v, 2))] if value else ["search: {}"]
            lines += _comment("e.g. training.learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}", 2)
            for name, f in schema.SearchParam.model_fields.items():
                lines += _comment(f"{name}: {_describe(f)}", 2)
        elif sub is not None and isinstance(value, dict):
            lines += _comment(SECTION_HELP.get(section) or _doc(sub) or field.description, 0)
            lines.append(f"{section}:")
            lines += _model_lines(sub, value, 2)
        elif sub is not None:  # an optional section that is off (peft: null): its keys, commented out
            lines += _comment(SECTION_HELP.get(section) or _doc(sub) or field.description, 0)
            lines += _dump(section, None, 0)
            lines.append(f"# {section}:")
            lines += ["# " + line for line in _model_lines(sub, _defaults_of(sub), 2)]
        else:
            lines += _comment(_describe(field), 0)
            lines += _dump(section, value, 0)
    return "\n".join(lines) + "\n"


def _defaults_of(model: type[BaseModel]) -> dict[str, Any]:
    """A section's default values; {} for one whose fields are required (a sweep's search parameter)."""
    try:
        return model().model_dump(mode="json")
    except Exception:
        return {}


def _find_field(section: str):
    for owner in (config.Config, schema.SweepConfig):
        if section in owner.model_fields:
            return owner.model_fields[section], owner
    return None, None


def _model_lines(model: type[BaseModel], values: dict[str, Any], indent: int) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        value = values.get(name, _default(field))
        sub = _submodel(field.annotation)
        lines += _comment(_describe(field), indent)
        if sub is not None and isinstance(value, dict) and value:
            lines.append(" " * indent + f"{name}:")
            lines += _model_lines(sub, value, indent + 2)
        else:
            lines += _dump(name, value, indent)
    return lines


def _training(cfg: config.Config) -> list[str]:
    """llmcli's training keys, then the config's other TrainingArguments keys, then the common ones
    it leaves unset (commented out, with TrainingArguments' defaults)."""
    from importlib import metadata

    ta_fields = training_argument_fields()
    section = config.TrainingSection
    values = cfg.training.model_dump(mode="json")
    lines = _comment(SECTION_HELP["training"], 0) + ["training:"]
    for name, field in section.model_fields.items():
        note = " Required (or --output-dir)." if name == "output_dir" else ""
        lines += _comment(_describe(field) + note, 2)
        lines += _dump(name, values.get(name), 2)
    extras = [k for k in (cfg.training.model_extra or {}) if k not in section.model_fields]
    for name in sorted(extras, key=lambda k: (COMMON_TRAINING_ARGUMENTS.index(k) if k in COMMON_TRAINING_ARGUMENTS else 999, k)):
        lines += _comment(_ta_help(ta_fields.get(name), name), 2)
        lines += _dump(name, values.get(name), 2)
    unset = [k for k in COMMON_TRAINING_ARGUMENTS if k in ta_fields and k not in values]
    if unset:
        lines.append("")
        lines += _comment(f"Common TrainingArguments (defaults of transformers {metadata.version('transformers')}); uncomment to "
                          "change. Any other TrainingArguments field works too.", 2)
        for name in unset:
            lines += _comment(_ta_help(ta_fields[name], name), 2)
            lines += ["  # " + line[2:] for line in _dump(name, ta_fields[name].default, 2)]
    return lines


@dataclasses.dataclass
class TrainingArgument:
    default: Any
    help: str
    annotation: str = ""  # the declared type as written in the source


# What a TrainingArguments annotation may name for `--from`'s type check; a field whose annotation
# names anything else (its enums: IntervalStrategy, OptimizerNames, ...) has its name checked only.
_ANNOTATION_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list, "None": type(None),
                     "Optional": typing.Optional, "Union": typing.Union, "Any": typing.Any, "Literal": typing.Literal}


def _checked_training(cfg: config.Config) -> dict[str, Any]:
    """The `training:` keys of a `--from` config checked as a run checks them, torch-free: names and
    types from TrainingArguments' source (a feedback task's TRL class is imported, as a run does)."""
    from llmcli import tasks

    training = cfg.training.model_dump()
    if cfg.task in tasks.FEEDBACK_TASKS:
        return tasks.check_training_keys(training, tasks.args_class(cfg.task))
    fields, hints = training_argument_fields(), {}
    for name, field in fields.items():
        try:
            hints[name] = _annotation(ast.parse(field.annotation, mode="eval").body)
        except (KeyError, SyntaxError, TypeError, ValueError):
            pass
    for ref in cfg.training.callbacks:
        tasks.callback_class(ref)
    return tasks.check_training_values(training, set(fields), hints, "TrainingArguments")


def _annotation(node):
    """A type from an annotation's syntax tree, built from `_ANNOTATION_NAMES` only (KeyError otherwise)."""
    if isinstance(node, ast.Constant) and node.value is None:
        return type(None)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # a quoted annotation
        return _annotation(ast.parse(node.value, mode="eval").body)
    if isinstance(node, ast.Name):
        return _ANNOTATION_NAMES[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        sides = [node.left, node.right]
        if any(isinstance(n, ast.Name) and n.id == "str" for n in sides) and any(
                isinstance(n, ast.Name) and n.id not in _ANNOTATION_NAMES for n in sides):
            return str  # `SchedulerType | str`: a string enum or any string, so any string
        return typing.Union[_annotation(node.left), _annotation(node.right)]
    if isinstance(node, ast.Subscript):
        base = _annotation(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if base is typing.Literal:
            return typing.Literal[tuple(ast.literal_eval(a) for a in args)]
        resolved = tuple(_annotation(a) for a in args)
        return base[resolved if len(resolved) > 1 else resolved[0]]
    raise KeyError(ast.dump(node))


def training_argument_fields() -> dict[str, TrainingArgument]:
    """The installed `transformers.TrainingArguments` fields, each with its default and help, read
    from its source rather than imported: importing it loads torch (5 s), and `llmcli init` stays
    torch-free. A default that is no literal is the last value the class body gives that name
    (`optim`'s default_optim); the import is the fallback should the source not parse."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("transformers")
        tree = ast.parse((Path(next(iter(spec.submodule_search_locations))) / "training_args.py").read_text(encoding="utf-8"))
        body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments").body
    except (AttributeError, OSError, StopIteration, SyntaxError, TypeError):
        return _imported_training_argument_fields()
    names: dict[str, Any] = {}
    for node in _class_statements(body):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            names[node.targets[0].id] = _literal(node.value, {})
    fields = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)) or node.value is None:
            continue
        default, help_ = node.value, ""
        if isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "field":
            keywords = {kw.arg: kw.value for kw in node.value.keywords}
            default = keywords.get("default")
            meta = _literal(keywords["metadata"], {}) if "metadata" in keywords else None
            help_ = meta.get("help", "") if isinstance(meta, dict) else ""
        fields[node.target.id] = TrainingArgument(_literal(default, names), help_ or "", ast.unparse(node.annotation))
    return fields


def _literal(node, names: dict[str, Any]) -> Any:
    if node is None:
        return None
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _class_statements(body):
    """The statements of a class body, into its if/try blocks but not its methods."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try)):
            for block in (node.body, node.orelse, getattr(node, "finalbody", [])):
                yield from _class_statements(block)


def _imported_training_argument_fields() -> dict[str, TrainingArgument]:
    from transformers import TrainingArguments

    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.init:
            value = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out[f.name] = TrainingArgument(value.value if isinstance(value, enum.Enum) else value, f.metadata.get("help", ""))
    return out


def _ta_help(field: TrainingArgument | None, name: str) -> str:
    text = " ".join(((field.help if field else None) or "").split()).replace("%%", "%")
    first = ""
    for sentence in text.split(". "):
        first = f"{first}. {sentence}" if first else sentence
        if len(first) >= 40:
            break
    first = first.rstrip(".")
    if len(first) > 110:
        first = first[:107].rstrip() + "..."
    note = _LLMCLI_NOTES.get(name)
    return " ".join(p for p in (first + "." if first else "", note) if p) or name


def _describe(field) -> str:
    text = field.description or ""
    choices = _literal_choices(field.annotation)
    if choices:
        text += f" One of: {', '.join(map(str, choices))}."
    return text


def _literal_choices(annotation) -> tuple | None:
    """The values a field takes: its Literal's and Enum's members together (task: auto or a Task)."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return tuple(member.value for member in annotation)
    found = [c for arg in typing.get_args(annotation) for c in (_literal_choices(arg) or ())]
    return tuple(found) or None


def _submodel(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def _default(field) -> Any:
    if field.is_required():
        return None  # required: no default to show (the description says what to give)
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def _doc(model) -> str | None:
    doc = (model.__doc__ or "").strip()
    return doc.splitlines()[0] if doc and not doc.startswith(("A base class", "Usage docs")) else None


def _comment(text: str | None, indent: int, width: int = 100) -> list[str]:
    if not text:
        return []
    import textwrap

    pad = " " * indent + "# "
    return textwrap.wrap(text, width=width, initial_indent=pad, subsequent_indent=pad)


def _dump(name: str, value: Any, indent: int) -> list[str]:
    """`name: value` with the value in YAML flow style (one line)."""
    if isinstance(value, str) and "\n" in value:
        import json

        text = json.dumps(value, ensure_ascii=False)  # a JSON string is a valid double-quoted YAML scalar
    else:
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000, allow_unicode=True).strip()
        text = text.removesuffix("...").strip()  # the document-end marker after a plain scalar
    return [" " * indent + f"{name}: {text}"]
