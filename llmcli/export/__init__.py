"""The export wing: `llmcli export` - a classifier as ONNX beside its weights, checked against the
model before it is written, or a LoRA run dir as a full model dir (`export.py`).

May import: the core, data and models. Not generate or evaluate (siblings) or any wing above.
"""
