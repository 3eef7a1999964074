"""Reading a JSON file a user points us at, with a one-line error instead of a traceback."""

import json
import os


def read_json(path: str, what: str):
    """The JSON value stored at ``path``.

    ``what`` names the file for the user (a flag such as ``--suffix-data`` or a description such as
    ``the model's config.json``). A missing file raises FileNotFoundError, an unreadable or
    malformed one ValueError, each in one line that starts with ``what`` and names ``path``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{what}: cannot read {path}: not valid JSON ({e})") from None
