"""Errors a user can act on (as opposed to bugs): the command line prints them in one line."""


class UserError(RuntimeError):
    """Something the user can fix: weights that cannot be obtained, a model used before fitting."""
