"""Trainers: one accelerate loop (loop.py) and the tasks that use it (classification, personalization)."""
