"""Runnable examples: small jobs that show dtrain in existing DDP code."""
