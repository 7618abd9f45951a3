"""Train the example Llama: ``python examples/train_llama.py [options]`` (see ``--help``)."""

import sys

from bmtrain.examples.train import main

if __name__ == "__main__":  # the launcher starts worker processes that re-import this file
    main(["--model", "llama", *sys.argv[1:]])
