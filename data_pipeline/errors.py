"""The one exception type of the data pipeline.

Bad data must never pass silently: every problem with a manifest, a shard, an input file or a
tokenizer raises ``DataError`` with a message that names the offending field, file or shard, so a
user can fix the input without reading a traceback.  It subclasses ``ValueError`` so callers that
already treat configuration problems as ``ValueError`` handle it too.
"""


class DataError(ValueError):
    """A data problem; the message names the field, file or shard at fault."""
