"""Models: the catalog, fetching (`sources`), GGUF reading, loading a shard into mlx-lm's
model classes (`loader`, `tensor_slicing`), and the tokenizer with its chat template."""
