"""Prompt sets and prompt formats: what a study feeds a model, and how it becomes token ids."""
