"""Train the example GPT: ``python examples/train_gpt.py [options]`` (see ``--help``)."""

import sys

from bmtrain.examples.train import main

if __name__ == "__main__":  # the launcher starts worker processes that re-import this file
    main(["--model", "gpt", *sys.argv[1:]])
