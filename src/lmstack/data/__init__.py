"""Reading corpora and records: text, JSONL, with errors that name the file and line."""
