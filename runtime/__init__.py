"""The machinery the commands and the course code run on.

The fast engine (one KV cache, one generation core, the packed loss), the training loop's
pieces (checkpoints, stop requests, torchrun), the tokenizer, a run's settings and files,
the model file, the judge's host and client, and the errors every layer raises."""
