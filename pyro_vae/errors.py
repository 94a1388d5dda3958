"""The one exception type that the CLI turns into a single line and a non-zero exit."""


class UserError(Exception):
    """A mistake the user can fix: bad option, bad data, bad file. Never a bug in pyro-vae."""
