"""Classifiers on ONNX Runtime: `model.onnx` beside a classifier's weights, written by `llmcli export`.

`generate` and `eval` label text with it when it is there (`--runtime auto`, the default) or when
`--runtime onnx` asks for it; `--runtime torch` never does. The export is checked before it is
written (`export.py`), and records which weights it came from (`model.onnx.json`: size and SHA-256
of model.safetensors); a model.onnx whose weights have changed since is not used by `auto`.

`OnnxClassifier` answers what the classifier paths ask of a Transformers model: `model(**batch)
.logits`, `.config`, `.device`, `.dtype`, `.eval()`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

from llmcli import console
from llmcli.errors import ConfigError

ONNX_FILE, RECORD_FILE = "model.onnx", "model.onnx.json"
RECORD_FORMAT = 2  # 2: exports trace only the tokenizer's inputs, and a reward model's check compares its scores


def weights_fingerprint(model_dir: Path) -> dict[str, object]:
    """Which weights an export came from: model.safetensors' size and SHA-256."""
    weights = model_dir / "model.safetensors"
    digest = hashlib.sha256()
    with weights.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"weights": weights.name, "bytes": weights.stat().st_size, "sha256": digest.hexdigest()}


def choose(model_dir: str, kind, runtime: str) -> bool:
    """Whether to label with model_dir's model.onnx: `onnx` demands it, `auto` takes a current one
    (`runtime` is `model.runtime`, which the schema limits to auto, torch and onnx)."""
    from llmcli.tasks import Task

    if runtime == "torch":
        return False
    path = Path(model_dir) / ONNX_FILE
    if runtime == "onnx":
        if kind != Task.CLASSIFICATION:
            raise ConfigError(f"--runtime onnx: {model_dir} is not a classifier (ONNX Runtime serves classifiers here)")
        if not path.exists():
            raise ConfigError(f"--runtime onnx: no {path}; write it with `llmcli export --model {model_dir}`")
        need_onnxruntime()
        return True
    if kind != Task.CLASSIFICATION or not path.exists():
        return False
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        console.warn(f"{path} is not used: onnxruntime is not installed (pip install 'llmcli[onnx]')")
        return False
    try:
        record = json.loads((Path(model_dir) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("format") != RECORD_FORMAT:
        console.warn(f"{path} is not used: an older `llmcli export` wrote it, whose GPT-2-style classifiers and reward "
                     "models could differ from the model (run `llmcli export` again)")
        return False
    current = record.get("source") == weights_fingerprint(Path(model_dir))
    if not current:
        console.warn(f"{path} is not used: the weights changed since it was exported (run `llmcli export` again)")
    return current


def need_onnxruntime() -> None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX Runtime is not installed: pip install 'llmcli[onnx]'") from None


class OnnxClassifier:
    """A sequence classifier's model.onnx in an ONNX Runtime session (CPU)."""

    def __init__(self, path: Path, config, profile: str | None = None):
        import onnxruntime as ort
        import torch

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = torch.get_num_threads()
        if profile:  # scripts/bench_classify.py --profile: ONNX Runtime's time by operator, to files named PROFILE_<date>.json
            options.enable_profiling, options.profile_file_prefix = True, profile
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.config, self.device, self.dtype, self.training = config, torch.device("cpu"), torch.float32, False
        self.runtime = "onnx"  # `llmcli eval` reports it

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, **_):
        import numpy as np
        import torch

        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        feed = {}
        for name in self.inputs:
            value = given.get(name)
            if value is None:
                value = torch.ones_like(input_ids) if name == "attention_mask" else torch.zeros_like(input_ids)
            feed[name] = np.ascontiguousarray(value.cpu().numpy().astype(np.int64))
        (logits,) = self.session.run(["logits"], feed)
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


def export(model, tokenizer, path: Path) -> None:
    """Write `model` (a sequence classifier) as ONNX at `path`: inputs input_ids, attention_mask (and
    token_type_ids where the model takes them and the tokenizer gives them), batch and length dynamic;
    output logits. Only the tokenizer's inputs: GPT-2 takes token_type_ids too, but adds their
    embedding when they are given, so zeros there would change every score."""
    import inspect
    import logging

    import torch

    logging.getLogger("torch.onnx").setLevel(logging.INFO if console.debug() else logging.ERROR)  # its optional-op notes
    sample = tokenizer(["an example to trace", "a second, longer example to trace the shapes"], padding=True, return_tensors="pt")
    params = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params and n in sample]

    class Logits(torch.nn.Module):
        """The classifier with positional inputs, returning its logits alone."""

        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{n: given[n] for n in names}).logits

    args = tuple(sample[n] for n in names)
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with torch.no_grad():
        torch.onnx.export(Logits().eval(), args, str(path), input_names=names, output_names=["logits"], dynamo=True,
                          dynamic_shapes=tuple({0: batch, 1: length} for _ in names), external_data=False,
                          verbose=console.debug())
