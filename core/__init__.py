"""The ground floor: what every package of the node may import (errors, retry policy).

Imports nothing of the project; see docs/architecture.md for the import rules.
"""
