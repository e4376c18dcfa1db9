"""The ground floor: what every package of the node may import.

    errors.py      the NodeError tree (one family per package)
    retry.py       RetryPolicy, for the job queue and delivery
    loop.py        LoopThread, the background loop of every part
    validation.py  one wording for pydantic validation errors

Imports nothing of the project (tests/test_layering.py); see docs/architecture.md for the rules.
"""
