"""Preference data: files in, token-id groups and padded batches out (see README, "Data")."""
