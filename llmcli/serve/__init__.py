"""The serve wing: `llmcli serve`, an OpenAI-compatible HTTP server for any run dir or hub model.
`serve.py` loads the model and runs uvicorn, `api.py` is the FastAPI app (the OpenAI endpoints,
errors, auth), `engine.py` batches concurrent requests into `generate`'s batched forward.

May import: the core and every wing below it (it uses generate, evaluate and models). Only cli
sits above; report is its independent sibling.
"""
