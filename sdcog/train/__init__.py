"""Fine-tuning with `cog train` (train.py): `trainer` runs one training in this order: the archive
read and its images prepared (`dataset`), a LoRA (and the trigger word's embeddings) trained on the
loaded model (`lora_training`), and `trained_model.tar` written (`output`)."""
