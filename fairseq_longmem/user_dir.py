"""Print the folder to pass to fairseq's ``--user-dir``: ``--user-dir $(python -m fairseq_longmem.user_dir)``."""

import os


def path() -> str:
    return os.path.dirname(os.path.abspath(__file__))


if __name__ == "__main__":
    print(path())
