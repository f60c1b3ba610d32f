"""Development and release tools: benchmarks, soaks, fixtures, the bundled model's training, the
schema and README generators, and the local Cog server runner. Not shipped in the image
(.dockerignore) and never imported by the runtime package `sdcog`, which they use."""
