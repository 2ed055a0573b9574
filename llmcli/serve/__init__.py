"""The serve wing: `llmcli serve`, an OpenAI-compatible HTTP server for any run dir or hub model.

serve.py loads the model and runs uvicorn; api.py is the FastAPI app (the OpenAI endpoints,
errors, auth, metrics); engine.py batches concurrent requests into `generate`'s batched forward.
Imports the generate, evaluate and models wings and the core; nothing below imports it.
"""
