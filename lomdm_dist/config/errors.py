"""``ConfigError``: the one exception every configuration check raises.

A module of its own so that every section (``schema``, ``slurm``, ``parallel``) and every checker
outside the config package (the layout check, the process environment) can raise it without
importing the schema that declares the sections.
"""


class ConfigError(ValueError):
    """A configuration problem; the message names the key. Printed as one line without a traceback,
    and the command exits with status 2."""
