"""Fine-tuning on the serving pool (paper §1–3: a fine-tuning request becomes preprocess, train and evaluate
jobs). `preprocess.py`: chat JSONL → validated, templated, tokenized, assistant-masked, packed rows."""
