"""Trainers: one step-based accelerate loop (loop.py), one run skeleton (run.py), and the tasks built on them
(classification, personalization, class_conditional). ``visionpeft.config.tasks`` maps a config's ``task:`` to its
trainer; nothing here knows method names."""
