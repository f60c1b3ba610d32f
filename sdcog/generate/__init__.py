"""Step 3 of a request: the loaded model run on it (engine), with its LoRAs and embeddings applied
for this request only (loras, embeddings), its prompts encoded (prompt_syntax, prompt_encoding),
progress and cancellation between steps (progress, cancellation), and the safety checker's verdict
(safety)."""
