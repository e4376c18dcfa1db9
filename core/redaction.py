"""Library error text without the values it quotes (design.md, "No PHI in logs").

pydicom, hl7apy and others put the offending value in their messages (``Invalid value for VR
DA: '1931-02-17'``, a Patient's Name that broke a length limit). Such text is scrubbed before
the node logs or stores it: quoted spans become ``'<withheld>'``. The node's own messages
(``NodeError``) are written to name no patient and are kept whole.

    scrub_values("Invalid value for VR PN: 'Doe^John'")  -> "Invalid value for VR PN: '<withheld>'"
    error_text(exc)              -> "ValueError: ..."  for logs and the jobs' error column
    scrub_traceback(text)        -> a formatted traceback, its exception lines scrubbed
"""

from __future__ import annotations

import re

from core.errors import NodeError

WITHHELD = "'<withheld>'"
# A quoted span on one line: Python's repr of str and bytes values, and the quotes library
# messages put around values by hand. A quote inside a word (can't, O'Brien) neither opens
# nor closes one, so an apostrophe in the message or in the value does not pair wrongly.
_QUOTED = re.compile(r"""(?<!\w)b?'[^\n]*?'(?!\w)|(?<!\w)b?"[^\n]*?"(?!\w)""")


def scrub_values(text: str) -> str:
    """``text`` with every quoted span replaced by ``'<withheld>'``."""
    return _QUOTED.sub(WITHHELD, text)


def error_text(error: BaseException) -> str:
    """``Type: message`` for a log line or an error column; a library's message scrubbed."""
    message = str(error) if isinstance(error, NodeError) else scrub_values(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def scrub_traceback(text: str) -> str:
    """A formatted traceback with its exception lines scrubbed. Frame lines (indented: the
    file, line and source) are kept, so the traceback still says where it happened."""
    return "\n".join(
        line if line.startswith(" ") or line.startswith("Traceback (") else scrub_values(line)
        for line in text.split("\n")
    )
