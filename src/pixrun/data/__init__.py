"""Training data: the built-in shapes world, prepared shards and what a training step reads from them."""
