"""The one base class of user errors: bad input whose message is the whole story.

Every command catches :class:`UserError`, prints ``genderid <command>: error: <message>`` on one line and exits
2 with no traceback. Anything else is a bug (or an infrastructure failure) and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (a config, a path, a data set, a checkpoint, a request): the message names it."""
