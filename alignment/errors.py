"""Mistakes a user can fix: bad data, a bad recipe, a missing model, a reward function that misbehaves.

Each is raised as a UserError subclass whose message says what is wrong and where (file, line, field; the
recipe key; the path); `align` prints it as one line on stderr and exits 2, with the traceback only under
`--debug` (or ALIGN_DEBUG=1). Anything else is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave (data, recipe, paths, models, reward functions); the message is the fix's
    starting point."""
