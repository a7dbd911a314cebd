"""Preference data along its pipeline, one module per step:

1. `sources`    read the raw rows of a file, folder or hub dataset, each with its location;
2. `rows`       check a raw row against its schema: a `Pair`, or a `BadRow` naming file, line and field;
3. `formatting` render (prompt, response) and tokenize it, truncated to `max_length` (no Lightning);
4. `cache`      tokenize a split once into a memory-mapped folder keyed by data, tokenizer and settings;
5. `batching`   stack chosen and rejected into one `(2B, L)` batch; length-grouped, sharded batches;
6. `module`     the LightningDataModule that ties them together for train/val/test.
"""
