"""Step 2 of a request: what it refers to, read and checked: input files and images (input_files,
images, image_structure), and LoRAs and embeddings fetched into a bounded cache (adapter_references,
adapter_cache)."""
