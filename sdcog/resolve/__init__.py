"""Step 1 of a request: the inputs checked and completed into one `GenerationRequest` (request),
with the sampler names it may ask for (schedulers). Nothing is downloaded or run here."""
