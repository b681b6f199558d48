"""Files: PNG metadata, prompts files, output names."""
