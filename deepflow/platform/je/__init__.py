"""The job executor (paper §5): tokenizer pool, dispatcher, and its pure scheduling policies (`policies/`)."""
