"""``python -m pipeline.cli``: the ``loopline`` command."""

from pipeline.cli import main

if __name__ == "__main__":
    main()
