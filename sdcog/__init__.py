"""Stable Diffusion as a Cog model: everything predict.py runs, and nothing else (development and
release tools live in sdcog_tools/, which the image does not contain).

Setup loads the model once (`sdcog.model`). Each request then takes four steps, one subpackage
each, in this order:

1. `sdcog.resolve`: the inputs checked and completed into one request;
2. `sdcog.fetch`: input images read, LoRAs and embeddings fetched;
3. `sdcog.generate`: the model run on it;
4. `sdcog.write`: image files with their metadata.

Beside them: `errors` (the error users see), `liveness` and `heap` (the serving process).
"""

__version__ = "0.1.0"
