"""The report wing: `llmcli report` (`report.py`) over what a run dir says (`runinfo.py`), and
`llmcli init` (`init.py`), which writes a starting config from the schemas. Both stay torch-free.

May import: the core and every wing below it. Only cli sits above.
"""
