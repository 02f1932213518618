"""The training job's parts; fsdp_train.py puts them together (README, "A map of the folders")."""
