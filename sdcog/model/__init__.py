"""Setup, once per process: which model is in the weights, whether its files are whole, and how it
runs fastest on this device (families, weights, weights_check, safetensors_files, acceleration)."""
